"""`fabric events [-f] [--since DUR] [--type PATTERN] [--json]`: the fleet's history.

An ordered JetStream consumer on stream ``EVENTS`` starting at ``now -
since`` replays what happened; with ``-f`` it then follows live. Ordered
consumers are ephemeral and need no ack, so reading events changes nothing
on the server. Without ``-f`` the replay stops once the consumer has no
pending message.

``--json`` prints one CloudEvent per line (JSON Lines), as stored.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from fabric.cancelled import raise_if_cancelled
from fabric.cli import CommandFailed, UsageError
from fabric.client import FabricClient, add_client_options, run_cli
from fabric.controller.streams import EVENTS_STREAM
from schemas.codec import decode
from schemas.errors import ContractError
from schemas.event import CloudEvent

__all__ = ["matches", "parse_since", "register"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_IDLE = 0.5  # seconds without a message before asking the server what is left


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    events = subparsers.add_parser(
        "events",
        help="replay and follow fabric events",
        description=(
            "Replay events from the EVENTS stream since a time, then (with -f) follow."
            " PATTERN is a glob over the event kind, e.g. 'agent.*' or 'node.lost'."
        ),
    )
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "--since",
        default="1h",
        metavar="DUR",
        help="how far back: 90s, 5m, 2h, 1d, 1h30m, or an RFC 3339 time (default 1h)",
    )
    events.add_argument("--type", metavar="PATTERN", help="only kinds matching this glob")
    events.add_argument("--json", action="store_true", help="one CloudEvent JSON per line")
    add_client_options(events)
    events.set_defaults(handler=_events)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``5m`` -> now minus five minutes; an ISO/RFC 3339 time as it is."""
    now = now or datetime.now(UTC)
    compact = text.strip().lower()
    if compact and _DURATION.sub("", compact) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(compact))
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since must be a duration like 5m or 2h, or a time like 2024-05-01T12:00:00Z,"
            f" not {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def matches(pattern: str | None, event: CloudEvent) -> bool:
    return pattern is None or fnmatch.fnmatchcase(event.kind, pattern)


def _events(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    return run_cli(args, lambda client: _events_async(client, since, args))


def _line(event: CloudEvent) -> str:
    when = event.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    actor = f" by {event.actor}" if event.actor else ""
    subject = event.subject or "-"
    return f"{when}  {event.kind:<22} {subject:<20} {event.source}{actor}{_data(event.data)}"


def _data(data: Any) -> str:
    if not isinstance(data, dict) or not data:
        return ""
    # The ids are on the line already; the rest, compactly.
    shown = {k: v for k, v in data.items() if k not in ("agent_id", "node_id")}
    return "  " + " ".join(f"{k}={_short(v)}" for k, v in shown.items()) if shown else ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _print(events: Sequence[CloudEvent], as_json: bool) -> None:
    out = sys.stdout
    for event in events:
        out.write((msgspec.json.encode(event).decode() if as_json else _line(event)) + "\n")
    out.flush()


async def _events_async(client: FabricClient, since: datetime, args: argparse.Namespace) -> int:
    js = client.nc.jetstream()
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=since.astimezone(UTC),
    )
    try:
        sub = await js.subscribe(
            "events.>", stream=EVENTS_STREAM, ordered_consumer=True, config=config
        )
    except nats.js.errors.NotFoundError:
        raise CommandFailed("no EVENTS stream yet (has a controller ever run?)") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise CommandFailed(f"cannot read the EVENTS stream: {exc or type(exc).__name__}") from None
    try:
        while True:
            raise_if_cancelled()  # Ctrl-C: see fabric.cancelled
            try:
                msg = await sub.next_msg(timeout=_IDLE)
            except (nats.errors.TimeoutError, TimeoutError):
                if not args.follow and await _caught_up(sub):
                    return 0
                continue
            try:
                event = decode(msg.data, CloudEvent)
            except ContractError:
                continue  # not ours to judge here; the stream keeps it
            if matches(args.type, event):
                _print([event], args.json)
            if not args.follow and msg.metadata.num_pending == 0:
                return 0
    finally:
        await sub.unsubscribe()


async def _caught_up(sub: Any) -> bool:
    """True when the server has nothing more for this consumer and nothing is queued here."""
    if sub.pending_msgs:
        return False
    try:
        info = await sub.consumer_info()
    except (nats.errors.Error, TimeoutError):
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)
