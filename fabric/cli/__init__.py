"""The `fabric` operator CLI.

Each verb group lives in its own module exposing ``register(subparsers)``; the
module adds its parser and sets ``handler`` (a callable taking the parsed
namespace and returning an exit code). Errors meant for the user are raised as
:class:`UsageError` (exit 2) or :class:`CommandFailed` (exit 1) and printed as
one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fabric import __version__

__all__ = ["CommandFailed", "UsageError", "main"]


class UsageError(Exception):
    """Bad arguments: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The command could not do its job: printed as one line, exit code 1."""


def _verb_modules() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    # Imported lazily so `fabric --help` stays fast and one broken verb cannot
    # take the others down at import time.
    from fabric.cli import controller_cmd, nats_cmd, pki_cmd, token_cmd

    return [pki_cmd.register, token_cmd.register, nats_cmd.register, controller_cmd.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabric",
        description="Operate an agent-fabric: PKI, tokens, the embedded NATS server.",
    )
    parser.add_argument("--version", action="version", version=f"fabric {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND")
    subparsers.required = True
    for register in _verb_modules():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"fabric: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"fabric: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
