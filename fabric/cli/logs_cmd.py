"""`fabric logs [-f] [-n N] NAME`: an agent's output, from anywhere, through NATS.

Lines come from the node hosting the agent (the ``logs`` op tails its log
files). As `docker logs` does, the agent's stdout goes to our stdout and its
stderr to our stderr. The node keeps no timestamps per line, so the two
streams cannot be interleaved exactly; each keeps its own order.

``-f`` polls the ``logs`` op (the node does not publish ``agents.<id>.logs``
yet) and prints what is new since the previous answer. A deployment with
several replicas prints every replica's lines, prefixed with its id.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import IO, Literal

from fabric.cli import CommandFailed, UsageError
from fabric.client import (
    FabricClient,
    FabricError,
    add_client_options,
    check_name,
    resolve,
    run_cli,
)
from schemas.command import TailLogs
from schemas.errors import ErrorCode

__all__ = ["new_lines", "register"]

Stream = Literal["stdout", "stderr"]
_STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")
_FOLLOW_WINDOW = 1000  # lines asked for on each poll while following
_FOLLOW_INTERVAL = 0.5
_MAX_LINES = 10_000


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
    return run_cli(args, lambda client: _logs_async(client, args.name, count, streams, args.follow))


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
    client: FabricClient, name: str, count: int, streams: Sequence[Stream], follow: bool
) -> int:
    target = await resolve(client, name)
    if not target.agent_ids:
        raise CommandFailed(f"{name} has no replicas")
    prefixed = len(target.agent_ids) > 1
    seen: dict[tuple[str, Stream], list[str]] = {}
    for agent_id in target.agent_ids:
        prefix = f"{agent_id} | " if prefixed else ""
        for stream in streams:
            # Following compares windows of one size (see new_lines), so the
            # first answer is a whole window of which the last `count` lines show.
            window = max(count, _FOLLOW_WINDOW) if follow else count
            try:
                lines = await _tail(client, agent_id, stream, window)
            except FabricError as exc:
                if exc.code is ErrorCode.NOT_FOUND and target.record is None:
                    raise FabricError(exc.code, f"no deployment or agent named {name!r}") from None
                raise
            _emit(stream, prefix, lines[-count:])
            seen[(agent_id, stream)] = lines
    if not follow:
        return 0
    while True:
        await asyncio.sleep(_FOLLOW_INTERVAL)
        for agent_id in target.agent_ids:
            prefix = f"{agent_id} | " if prefixed else ""
            for stream in streams:
                try:
                    lines = await _tail(client, agent_id, stream, max(count, _FOLLOW_WINDOW))
                except FabricError as exc:
                    # Moved or not placed for a moment: keep following.
                    if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.TIMEOUT):
                        continue
                    raise
                _emit(stream, prefix, new_lines(seen.get((agent_id, stream), []), lines))
                seen[(agent_id, stream)] = lines
