"""`fabric apply -f FILE [--prune] [--dry-run] [--json]`: declarative deployments.

The file (TOML or YAML, chosen by its extension; ``-`` reads stdin) lists
deployments in the contract's own field names (:class:`schemas.api.Deployment`)::

    [[deployments]]
    replicas = 2
    [deployments.spec]
    name = "web"
    argv = ["python3", "-m", "http.server", "0"]
    [deployments.constraints]
    strategy = "spread"

Each deployment is compared with the fabric's record and then created,
updated (the changed fields are listed) or left alone, through the
controller's API; applying the same file twice changes nothing. With
``--prune`` every deployment the file does not name is deleted. A file that
does not parse or does not fit the contract is refused before anything is
sent (one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec

from fabric.cli import CommandFailed, UsageError
from fabric.cli.output import is_tty, print_json
from fabric.client import FabricClient, FabricError, add_client_options, run_cli
from schemas.api import (
    CreateDeployment,
    DeleteDeployment,
    Deployment,
    DeploymentRecord,
    ListDeployments,
    UpdateDeployment,
)

__all__ = ["Action", "ApplyFile", "Change", "diff_fields", "load_file", "plan", "register"]

_SHOWN_VALUE = 40  # a changed scalar longer than this is named, not shown


class ApplyFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What an apply file holds."""

    deployments: Annotated[list[Deployment], msgspec.Meta(max_length=10_000)] = []


class Action(StrEnum):
    CREATE = "created"
    UPDATE = "updated"
    UNCHANGED = "unchanged"
    DELETE = "removed"


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the diff: what apply does (or would do) to one deployment."""

    name: str
    action: Action
    fields: list[str] = field(default_factory=list)
    deployment: Deployment | None = None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    apply = subparsers.add_parser(
        "apply",
        help="create or update deployments from a TOML or YAML file",
        description=(
            "Make the fabric's deployments match FILE (TOML, or YAML for .yaml/.yml):"
            " create what is missing, update what differs, leave the rest; --prune"
            " also removes deployments the file does not name. Prints what changed."
        ),
    )
    apply.add_argument("-f", "--file", required=True, metavar="FILE", help="the file ('-': stdin)")
    apply.add_argument("--prune", action="store_true", help="delete deployments not in FILE")
    apply.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    apply.add_argument("--json", action="store_true", help="the diff as JSON")
    add_client_options(apply)
    apply.set_defaults(handler=_apply)


# --- the file ------------------------------------------------------------------


def _parse_text(text: str, kind: str) -> Any:
    if kind == "toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not valid TOML: {exc}") from None
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise ValueError("reading YAML needs pyyaml (pip install pyyaml)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError("not valid YAML: " + " ".join(str(exc).split())) from None
    return {} if data is None else data


def _kind(path: str, text: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".toml":
        return "toml"
    # No telling extension (stdin, .conf): TOML if it parses as TOML, else YAML.
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "yaml"
    return "toml"


def load_file(path: str) -> list[Deployment]:
    """The deployments in ``path``; :class:`UsageError` (one line) for any problem."""
    where = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = _parse_text(text, _kind(path, text))
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a table with a 'deployments' list at the top")
    try:
        parsed = msgspec.convert(data, ApplyFile)
    except (msgspec.ValidationError, ValueError) as exc:
        raise UsageError(f"{where}: {' '.join(str(exc).split())}") from None
    seen: set[str] = set()
    for deployment in parsed.deployments:
        if deployment.name in seen:
            raise UsageError(f"{where}: deployment {deployment.name!r} is given twice")
        seen.add(deployment.name)
    return parsed.deployments


# --- the diff ------------------------------------------------------------------


def _short(value: Any) -> str | None:
    if isinstance(value, dict | list):
        return None
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= _SHOWN_VALUE else None


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of what differs between two builtin trees (``replicas (1 -> 3)``)."""
    if isinstance(old, dict) and isinstance(new, dict) and old and new:
        out: list[str] = []
        for key in sorted(old.keys() | new.keys()):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                if old.get(key) != new.get(key):
                    out.append(path)
                continue
            out += diff_fields(old[key], new[key], path)
        return out
    if old == new:
        return []
    a, b = _short(old), _short(new)
    return [f"{prefix} ({a} -> {b})" if a is not None and b is not None else prefix]


def _builtins(deployment: Deployment) -> Any:
    # Defaults written out: a field set to its default in the file equals a
    # record where it was left out.
    return msgspec.to_builtins(deployment)


def plan(
    wanted: list[Deployment], current: dict[str, DeploymentRecord], prune: bool
) -> list[Change]:
    """What apply does, deployment by deployment, in the file's order then removals."""
    changes: list[Change] = []
    for deployment in wanted:
        record = current.get(deployment.name)
        if record is None or record.deleting:
            changes.append(Change(deployment.name, Action.CREATE, deployment=deployment))
        elif record.deployment == deployment:
            changes.append(Change(deployment.name, Action.UNCHANGED, deployment=deployment))
        else:
            fields = diff_fields(_builtins(record.deployment), _builtins(deployment))
            changes.append(Change(deployment.name, Action.UPDATE, fields, deployment))
    if prune:
        named = {d.name for d in wanted}
        for name in sorted(current):
            if name not in named and not current[name].deleting:
                changes.append(Change(name, Action.DELETE))
    return changes


# --- carrying it out -------------------------------------------------------------

_MARKS = {
    Action.CREATE: ("+", "green"),
    Action.UPDATE: ("~", "yellow"),
    Action.UNCHANGED: ("=", "dim"),
    Action.DELETE: ("-", "red"),
}


def _apply(args: argparse.Namespace) -> int:
    wanted = load_file(args.file)
    return run_cli(args, lambda client: _apply_async(client, wanted, args))


async def _apply_async(
    client: FabricClient, wanted: list[Deployment], args: argparse.Namespace
) -> int:
    listing = await client.api("list", ListDeployments())
    current = {r.name: r for r in listing.deployments}
    changes = plan(wanted, current, args.prune)
    done: list[Change] = []
    try:
        for change in changes:
            if not args.dry_run:
                await _carry_out(client, change, current.get(change.name))
            done.append(change)
    finally:
        _report(done, dry_run=args.dry_run, as_json=args.json)
    return 0


async def _carry_out(client: FabricClient, change: Change, record: DeploymentRecord | None) -> None:
    try:
        if change.action is Action.CREATE:
            assert change.deployment is not None
            if record is not None and record.deleting:
                raise CommandFailed(
                    f"{change.name}: is still being removed; apply again once it is gone"
                )
            await client.api("create", CreateDeployment(deployment=change.deployment))
        elif change.action is Action.UPDATE:
            assert change.deployment is not None
            await client.api("update", UpdateDeployment(deployment=change.deployment))
        elif change.action is Action.DELETE:
            await client.api("delete", DeleteDeployment(name=change.name))
    except FabricError as exc:
        raise FabricError(exc.code, f"{change.name}: {exc} ({exc.code.value})") from None


def _report(changes: list[Change], *, dry_run: bool, as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {"name": c.name, "action": c.action.value, "fields": c.fields, "dry_run": dry_run}
                for c in changes
            ]
        )
        return
    width = max((len(c.name) for c in changes), default=0)
    tty = is_tty()
    lines = []
    for change in changes:
        mark, colour = _MARKS[change.action]
        what = change.action.value
        if dry_run and change.action is not Action.UNCHANGED:
            what = f"would be {what}"
        if change.fields:
            what += ": " + ", ".join(change.fields)
        text = f"{mark} {change.name.ljust(width)}  {what}"
        lines.append(f"[{colour}]{_escape(text)}[/{colour}]" if tty else text)
    counts = {a: sum(1 for c in changes if c.action is a) for a in Action}
    summary = ", ".join(f"{n} {a.value}" for a, n in counts.items() if n) or "nothing to apply"
    lines.append(summary + (" (dry run: nothing was changed)" if dry_run else ""))
    if tty:
        from rich.console import Console

        console = Console(highlight=False)
        for line in lines:
            console.print(line)
    else:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
