"""`fabric logs [-f] [-n N] NAME`: an agent's output, from anywhere, through NATS.

Lines come from the node hosting the agent (the ``logs`` op tails its log
files). As `docker logs` does, the agent's stdout goes to our stdout and its
stderr to our stderr. The node keeps no timestamps per line, so the two
streams cannot be interleaved exactly; each keeps its own order.

``-f`` subscribes to ``agents.<id>.logs`` first, then asks the node for the
tail with ``follow`` seconds, which makes it publish new lines of both
streams as ``LogBatch`` messages; the follow is renewed before it runs out.
A node that does not know ``follow`` is polled instead: the ``logs`` op
again and again, printing what is new since the previous answer. A
deployment with several replicas prints every replica's lines, prefixed
with its id.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Literal

from nats.aio.msg import Msg

from fabric.cancelled import raise_if_cancelled
from fabric.cli import CommandFailed, UsageError
from fabric.cli.events_cmd import parse_since
from fabric.client import (
    FabricClient,
    FabricError,
    Target,
    add_client_options,
    check_name,
    resolve,
    run_cli,
)
from schemas import subjects
from schemas.codec import decode
from schemas.command import TailLogs
from schemas.errors import ContractError, ErrorCode
from schemas.logs import LogBatch

__all__ = ["new_lines", "register"]

Stream = Literal["stdout", "stderr"]
_STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")
_FOLLOW_WINDOW = 1000  # lines asked for on each poll while following
_FOLLOW_INTERVAL = 0.5
_MAX_LINES = 10_000
_FOLLOW_SECONDS = 30.0  # how long the node publishes per request
_RENEW_EVERY = 10.0  # asked again well before that runs out


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    logs = subparsers.add_parser(
        "logs",
        help="show an agent's output",
        description="Show the last lines of an agent's stdout (to stdout) and stderr (to stderr).",
    )
    logs.add_argument("name", metavar="NAME", help="deployment or agent id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--tail", default="100", metavar="N", help="lines per stream (100)")
    logs.add_argument(
        "--stream", choices=("all", *_STREAMS), default="all", help="which output (all)"
    )
    logs.add_argument(
        "--since",
        metavar="DUR",
        help="only lines written since then: 90s, 5m, 2h, or an RFC 3339 time"
        " (to within one metrics tick of the node)",
    )
    add_client_options(logs)
    logs.set_defaults(handler=_logs)


def new_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """Lines of ``current`` not in ``previous``: two tails of one file, same window size.

    With equal windows, ``current`` starts where ``previous`` started, or later
    once the file outgrew the window; so the largest overlap of
    ``previous``'s end with ``current``'s start is what was printed already.
    No overlap (rotation, or more new lines than a window) prints it all.
    """
    if not previous:
        return list(current)
    last = previous[-1]
    # Only positions holding previous's last line can end an overlap.
    for k in range(min(len(previous), len(current)), 0, -1):
        if current[k - 1] == last and list(current[:k]) == list(previous[-k:]):
            return list(current[k:])
    return list(current)


def _logs(args: argparse.Namespace) -> int:
    check_name(args.name)
    try:
        count = int(args.tail)
    except ValueError:
        raise UsageError(f"-n must be a whole number, not {args.tail!r}") from None
    if not 1 <= count <= _MAX_LINES:
        raise UsageError(f"-n must be from 1 to {_MAX_LINES}, not {count}")
    streams = _STREAMS if args.stream == "all" else (args.stream,)
    since = None if args.since is None else parse_since(args.since)
    return run_cli(
        args, lambda client: _logs_async(client, args.name, count, streams, args.follow, since)
    )


async def _tail(client: FabricClient, agent_id: str, stream: Stream, count: int) -> list[str]:
    result = await client.command(agent_id, TailLogs(stream=stream, lines=count))
    return list(result.logs.lines) if result.logs else []


def _out(stream: Stream) -> IO[str]:
    return sys.stdout if stream == "stdout" else sys.stderr


def _emit(stream: Stream, prefix: str, lines: Sequence[str]) -> None:
    if not lines:
        return
    out = _out(stream)
    out.write("".join(f"{prefix}{line}\n" for line in lines))
    out.flush()


async def _logs_async(
    client: FabricClient,
    name: str,
    count: int,
    streams: Sequence[Stream],
    follow: bool,
    since: datetime | None = None,
) -> int:
    target = await resolve(client, name)
    if not target.agent_ids:
        raise CommandFailed(f"{name} has no replicas")
    if follow:
        try:
            await _follow_published(client, target, count, streams, since)
        except FabricError as exc:
            if exc.code is not ErrorCode.INVALID_PAYLOAD:
                raise
            # A node from before `follow` refuses the field: poll it instead.
        else:
            return 0
    seen = await _print_tails(client, target, count, streams, window=follow, since=since)
    if follow:
        await _follow_polling(client, target, count, streams, seen)
    return 0


def _prefix(target: Target, agent_id: str) -> str:
    return f"{agent_id} | " if len(target.agent_ids) > 1 else ""


async def _tail_or_not_found(
    client: FabricClient, target: Target, agent_id: str, command: TailLogs
) -> list[str]:
    try:
        result = await client.command(agent_id, command)
    except FabricError as exc:
        if exc.code is ErrorCode.NOT_FOUND and target.record is None:
            raise FabricError(exc.code, f"no deployment or agent named {target.name!r}") from None
        raise
    return list(result.logs.lines) if result.logs else []


async def _print_tails(
    client: FabricClient,
    target: Target,
    count: int,
    streams: Sequence[Stream],
    *,
    window: bool,
    since: datetime | None = None,
) -> dict[tuple[str, Stream], list[str]]:
    seen: dict[tuple[str, Stream], list[str]] = {}
    for agent_id in target.agent_ids:
        for stream in streams:
            # Polling compares windows of one size (see new_lines), so it starts
            # from a whole window of which the last `count` lines show.
            size = max(count, _FOLLOW_WINDOW) if window else count
            lines = await _tail_or_not_found(
                client, target, agent_id, TailLogs(stream=stream, lines=size, since=since)
            )
            _emit(stream, _prefix(target, agent_id), lines[-count:])
            seen[(agent_id, stream)] = lines
    return seen


async def _follow_published(
    client: FabricClient,
    target: Target,
    count: int,
    streams: Sequence[Stream],
    since: datetime | None = None,
) -> None:
    """Tail, then print the batches the node publishes; renew until interrupted."""
    batches: asyncio.Queue[LogBatch] = asyncio.Queue()

    async def on_batch(msg: Msg) -> None:
        try:
            batches.put_nowait(decode(msg.data, LogBatch, max_bytes=64 * 1024 * 1024))
        except ContractError:
            return

    # Subscribed before the node is asked, so no published batch is missed;
    # batches wait in the queue until the tails are printed.
    subs = [
        await client.nc.subscribe(subjects.agent_logs(agent_id), cb=on_batch)
        for agent_id in target.agent_ids
    ]
    try:
        await client.nc.flush()
        for agent_id in target.agent_ids:
            for i, stream in enumerate(streams):
                # One request starts the follow (of both streams) per agent.
                follow = _FOLLOW_SECONDS if i == 0 else None
                command = TailLogs(stream=stream, lines=count, follow=follow, since=since)
                lines = await _tail_or_not_found(client, target, agent_id, command)
                _emit(stream, _prefix(target, agent_id), lines)
        await _print_batches(client, target, streams, batches)
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _print_batches(
    client: FabricClient,
    target: Target,
    streams: Sequence[Stream],
    batches: asyncio.Queue[LogBatch],
) -> None:
    loop = asyncio.get_running_loop()
    renew_at = loop.time() + _RENEW_EVERY
    while True:
        raise_if_cancelled()  # Ctrl-C: see fabric.cancelled
        try:
            async with asyncio.timeout(max(0.0, renew_at - loop.time())):
                batch = await batches.get()
        except TimeoutError:
            for agent_id in target.agent_ids:
                renew = TailLogs(lines=1, follow=_FOLLOW_SECONDS)
                try:
                    await client.command(agent_id, renew)
                except FabricError as exc:
                    # Moving between nodes, or restarting: ask again next time.
                    if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.TIMEOUT):
                        raise
            renew_at = loop.time() + _RENEW_EVERY
            continue
        prefix = _prefix(target, batch.agent_id)
        if batch.dropped:
            print(f"{prefix}[{batch.dropped} lines dropped]", file=sys.stderr, flush=True)
        for line in batch.lines:
            if line.stream in streams:
                _emit(line.stream, prefix, [line.line])


async def _follow_polling(
    client: FabricClient,
    target: Target,
    count: int,
    streams: Sequence[Stream],
    seen: dict[tuple[str, Stream], list[str]],
) -> None:
    while True:
        raise_if_cancelled()
        await asyncio.sleep(_FOLLOW_INTERVAL)
        for agent_id in target.agent_ids:
            for stream in streams:
                try:
                    lines = await _tail(client, agent_id, stream, max(count, _FOLLOW_WINDOW))
                except FabricError as exc:
                    # Moved or not placed for a moment: keep following.
                    if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TIMEOUT):
                        continue
                    raise
                _emit(
                    stream,
                    _prefix(target, agent_id),
                    new_lines(seen.get((agent_id, stream), []), lines),
                )
                seen[(agent_id, stream)] = lines
