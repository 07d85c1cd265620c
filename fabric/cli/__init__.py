"""The `fabric` operator CLI.

Each verb group lives in its own module exposing ``register(subparsers)``; the
module adds its parser and sets ``handler`` (a callable taking the parsed
namespace and returning an exit code). Errors meant for the user are raised as
:class:`UsageError` (exit 2) or :class:`CommandFailed` (exit 1) and printed as
one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from fabric import __version__

__all__ = ["CommandFailed", "UsageError", "main"]


class UsageError(Exception):
    """Bad arguments: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The command could not do its job: printed as one line, exit code 1."""


EPILOG = """\
exit codes:
  0  success
  1  the command failed, or no fabric was found or reachable
  2  bad usage (unknown flag, bad value)
  130  interrupted (Ctrl-C)

The CLI finds the fabric by itself: --state-dir DIR, else the FABRIC_* environment,
else .fabric/fabric.env here or in a parent directory (written by `fabric up`).
"""


# Verbs that take a command line of their own after `--`.
_COMMAND_VERBS = frozenset({"run"})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its own are usage + error, two lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _verb_modules() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    # Imported lazily so `fabric --help` stays fast and one broken verb cannot
    # take the others down at import time.
    from fabric.cli import (
        agents_cmd,
        apply_cmd,
        controller_cmd,
        dashboard_cmd,
        events_cmd,
        listing_cmd,
        logs_cmd,
        nats_cmd,
        pki_cmd,
        task_cmd,
        token_cmd,
        top_cmd,
        up_cmd,
    )

    return [
        up_cmd.register,
        agents_cmd.register,
        apply_cmd.register,
        listing_cmd.register,
        logs_cmd.register,
        events_cmd.register,
        top_cmd.register,
        dashboard_cmd.register,
        pki_cmd.register,
        token_cmd.register,
        nats_cmd.register,
        controller_cmd.register,
        task_cmd.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fabric",
        description="Run and operate an agent-fabric: `fabric up`, then run, watch and stop"
        " agents from any terminal.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fabric {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND")
    subparsers.required = True
    for register in _verb_modules():
        register(subparsers)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; a verb declaring ``command_argv`` gets everything after the first ``--``.

    argparse alone cannot take a command with its own options after ``--``
    once the verb has optional flags too (`fabric run web --replicas 2 -- cmd -x`).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    verb = next((w for w in words if not w.startswith("-")), None)
    if "--" in words and verb in _COMMAND_VERBS:
        cut = words.index("--")
        args = parser.parse_args(words[:cut])
        if hasattr(args, "command_argv"):
            args.command_argv = words[cut + 1 :]
            return args
    return parser.parse_args(words)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
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
    except BrokenPipeError:
        # `fabric events | head`: the reader left. Point stdout at /dev/null so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
