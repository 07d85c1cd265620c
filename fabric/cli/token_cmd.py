"""`fabric token`: mint a short-lived operator token."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fabric.cli import CommandFailed, UsageError
from fabric.tokens import DEFAULT_AUDIENCE, SCOPES, SIGNING_KEY, TokenIssuer

__all__ = ["register"]

DEFAULT_TTL = 300.0
DEFAULT_ISSUER = "fabric-cli"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "token", help="operator tokens", description="Mint short-lived operator tokens."
    )
    verbs = parser.add_subparsers(dest="token_verb", metavar="ACTION")
    verbs.required = True

    issue = verbs.add_parser("issue", help="mint a token and print it on stdout")
    keys = issue.add_mutually_exclusive_group()
    keys.add_argument("--key", type=Path, metavar="PATH", help="Ed25519 signing key (PEM)")
    keys.add_argument(
        "--dir", type=Path, metavar="DIR", help=f"PKI directory: use DIR/{SIGNING_KEY}"
    )
    issue.add_argument("--subject", required=True, metavar="WHO", help="who is asking")
    issue.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="S",
        help=f"granted scope, repeatable: {', '.join(SCOPES)}",
    )
    issue.add_argument("--agent", metavar="ID", help="bind the token to this agent")
    issue.add_argument("--node", metavar="ID", help="bind the token to this node")
    # Strings, converted by the handler: argparse's type errors are two lines.
    issue.add_argument("--ttl", default=str(DEFAULT_TTL), metavar="SECONDS", help="lifetime (300)")
    issue.add_argument("--audience", default=DEFAULT_AUDIENCE, metavar="A")
    issue.add_argument("--issuer", default=DEFAULT_ISSUER, metavar="NAME", help="the iss claim")
    issue.set_defaults(handler=_issue)


def _ttl(text: str) -> float:
    try:
        ttl = float(text)
    except ValueError:
        raise UsageError(f"--ttl must be a number of seconds, not {text!r}") from None
    if not (math.isfinite(ttl) and ttl >= 1):
        raise UsageError(f"--ttl must be at least 1 second, not {text!r}")
    return ttl


def _issue(args: argparse.Namespace) -> int:
    ttl = _ttl(args.ttl)
    if args.key is not None:
        key_path: Path = args.key
    elif args.dir is not None:
        key_path = args.dir / SIGNING_KEY
    else:
        raise UsageError("give the signing key with --key PATH or --dir DIR")
    try:
        issuer = TokenIssuer.from_file(key_path, args.issuer)
    except FileNotFoundError:
        raise UsageError(
            f"no signing key at {key_path}: run `fabric pki init` or give --key"
        ) from None
    except OSError as exc:
        raise CommandFailed(f"{key_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"bad signing key {exc}") from None
    try:
        token = issuer.mint(
            args.subject,
            args.scope,
            agent=args.agent,
            node=args.node,
            ttl=ttl,
            audience=args.audience,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(token)
    return 0
