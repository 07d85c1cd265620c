"""`fabric pki`: make the CA, issue and revoke client identities, list them."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

from fabric.cli import CommandFailed, UsageError
from fabric.pki import (
    ROLES,
    InventoryEntry,
    PkiError,
    init_pki,
    issue_identity,
    load_inventory,
    revoke_identity,
)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "pki", help="certificates for mTLS", description="Make and manage the fabric's CA."
    )
    verbs = parser.add_subparsers(dest="pki_verb", metavar="ACTION")
    verbs.required = True

    init = verbs.add_parser("init", help="make a CA, server certificate and token signing key")
    _add_dir(init)
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="extra server name or IP address for the server certificate (repeatable)",
    )
    _add_days(init)
    _add_force(init)
    init.set_defaults(handler=_init)

    issue = verbs.add_parser("issue", help="issue a client certificate")
    _add_dir(issue)
    # A plain string, checked by fabric.pki: argparse's own choices error is
    # two lines (usage + error), and ours must be one.
    issue.add_argument("--role", required=True, help=f"one of: {', '.join(ROLES)}")
    _add_days(issue)
    issue.add_argument(
        "--force",
        action="store_true",
        help="issue a name again: new files, and the old certificate (revoked or not) is"
        " refused once the servers reload",
    )
    issue.add_argument("name", metavar="NAME", help="identity name (becomes the certificate CN)")
    issue.set_defaults(handler=_issue)

    revoke = verbs.add_parser(
        "revoke", help="mark an identity revoked (its certificate stays refused if re-issued)"
    )
    _add_dir(revoke)
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_revoke)

    listing = verbs.add_parser(
        "list", help="list issued identities: active, revoked and replaced certificates"
    )
    _add_dir(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_list)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, metavar="DIR", help="PKI directory")


def _add_days(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", default="365", metavar="N", help="validity in days (365)")


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _days(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--days must be a whole number, not {text!r}") from None


@contextlib.contextmanager
def _pki_errors(pki_dir: Path) -> Iterator[None]:
    # PkiError is always about what the user asked for (bad role, missing CA,
    # file exists): exit 2. The disk failing under us is exit 1.
    try:
        yield
    except PkiError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise CommandFailed(f"{exc.filename or pki_dir}: {exc.strerror or exc}") from None


def _init(args: argparse.Namespace) -> int:
    days = _days(args.days)
    with _pki_errors(args.dir):
        init_pki(args.dir, hosts=args.host, days=days, force=args.force)
    print(f"wrote CA, server certificate and token signing key to {args.dir}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    days = _days(args.days)
    with _pki_errors(args.dir):
        identity = issue_identity(args.dir, args.role, args.name, days=days, force=args.force)
    print(f"wrote {identity.cert} and {identity.key} ({identity.dn})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _pki_errors(args.dir):
        revoke_identity(args.dir, args.name)
    print(f"revoked {args.name} in {args.dir}")
    return 0


def _status(entry: InventoryEntry) -> str:
    if entry.revoked:
        return "revoked"
    # Issued by an older version: its DN is shared with every certificate
    # ever made for the name; `fabric pki issue --force` gives it its own.
    return "active" if entry.serial_in_dn else "active-legacy-dn"


def _list(args: argparse.Namespace) -> int:
    with _pki_errors(args.dir):
        entries = load_inventory(args.dir)
    if args.json:
        sys.stdout.write(msgspec.json.encode(entries).decode() + "\n")
        return 0
    rows = [("NAME", "ROLE", "NOT AFTER", "STATUS", "SERIAL")]
    for e in entries:
        rows.append((e.name, e.role, e.not_after, _status(e), e.serial))
        # Earlier certificates of the name: never accepted again, whatever
        # happens to the name (their DN carries their own serial).
        rows += [(e.name, e.role, "-", "replaced", serial) for serial in reversed(e.replaced)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    return 0
