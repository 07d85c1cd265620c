"""`fabric top [--once] [--json]`: a live full-screen view of the fleet.

Nodes (state, CPU, memory, load, agents, heartbeat age), agents (node,
state, health, pid, CPU, memory, restarts, uptime), the task backlog per type
(stored and not yet acked, running, waiting and the commonest reason why) and
the last events, kept current by :mod:`fabric.live` (one discovery call, then
subscriptions; the backlog is asked for again when task events say it moved,
and every few seconds for tasks that wait in silence). The screen is
redrawn when something changed, and once a second for the ages. Ctrl-C or ``q`` quits (exit 0).

Off a terminal, or with ``--once``, it prints one snapshot and exits: the
view as it stands once every known node has sent a heartbeat (or 1.5 s
passed). ``--json`` (with ``--once``) prints that snapshot as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from datetime import UTC, datetime

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fabric.cli.output import STATE_STYLES, age, human_bytes, human_duration, is_tty, print_json
from fabric.client import FabricClient, add_client_options, run_cli
from fabric.live import FleetView, NodeLive, follow
from schemas.agent import AgentState, AgentStatus
from schemas.discovery import TaskBacklog
from schemas.event import CloudEvent

__all__ = ["register", "render"]

_REDRAW = 1.0  # seconds between redraws when nothing changed (ages move)
_FIRST_BEATS = 1.5
_SHOWN_EVENTS = 8
_UP = frozenset({AgentState.RUNNING, AgentState.PAUSED})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = subparsers.add_parser(
        "top",
        help="live view of nodes, agents, task backlog and events",
        description=(
            "A live full-screen view of the fleet, updated from NATS subscriptions."
            " Ctrl-C or q quits. Off a terminal (or with --once) prints one snapshot."
        ),
    )
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    add_client_options(top)
    top.set_defaults(handler=_top)


# --- rendering -----------------------------------------------------------------


def _styled(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def _node_table(nodes: list[NodeLive], now: float) -> Table:
    table = Table(title="NODES", title_justify="left", box=None, header_style="bold")
    for header in ("NODE", "STATE", "CPU", "MEM", "LOAD", "AGENTS", "HEARTBEAT"):
        table.add_column(header, no_wrap=True)
    for node in nodes:
        m = node.metrics
        mem = (
            f"{human_bytes(m.memory_used_bytes)}/{human_bytes(m.memory_total_bytes)}" if m else "-"
        )
        beat_age = f"{now - node.beat_at:.1f}s" if node.beat_at is not None else "-"
        table.add_row(
            node.node_id,
            _styled(node.shown_state(now)),
            f"{m.cpu_percent:.1f}%" if m else "-",
            mem,
            f"{m.load1:.2f}" if m else "-",
            str(len(node.beat.agents)) if node.beat else "-",
            beat_age,
        )
    return table


def _agent_table(agents: list[AgentStatus], wall: datetime) -> Table:
    table = Table(title="AGENTS", title_justify="left", box=None, header_style="bold")
    headers = ("AGENT", "NODE", "STATE", "HEALTH", "PID", "CPU", "MEM", "RESTARTS", "UPTIME")
    for header in headers:
        table.add_column(header, no_wrap=True)
    for a in agents:
        m = a.metrics if a.state in _UP else None
        table.add_row(
            a.agent_id,
            a.node_id,
            _styled(a.state.value),
            _styled(a.health.value),
            str(a.pid) if a.pid and a.state in _UP else "-",
            f"{m.cpu_percent:.1f}%" if m else "-",
            human_bytes(m.rss_bytes) if m else "-",
            str(a.restarts),
            human_duration(age(a.since, wall)) if a.state in _UP else "-",
        )
    return table


def _task_table(tasks: list[TaskBacklog]) -> Table:
    table = Table(title="TASKS", title_justify="left", box=None, header_style="bold")
    for header in ("TYPE", "BACKLOG", "RUNNING", "WAITING", "WHY"):
        table.add_column(header, no_wrap=True)
    for t in tasks:
        why = max(t.reasons.items(), key=lambda kv: (kv[1], kv[0]))[0] if t.reasons else "-"
        table.add_row(
            t.type,
            str(t.backlog),
            Text(str(t.running), style="green" if t.running else ""),
            Text(str(t.waiting), style="yellow" if t.waiting else ""),
            why,
        )
    return table


def _event_table(events: list[CloudEvent]) -> Table:
    table = Table(title="EVENTS", title_justify="left", box=None, header_style="bold")
    for header in ("TIME", "KIND", "SUBJECT", "BY"):
        table.add_column(header, no_wrap=True)
    for e in events:
        table.add_row(
            e.time.astimezone().strftime("%H:%M:%S"), e.kind, e.subject or "-", e.actor or "-"
        )
    return table


def render(view: FleetView, where: str) -> RenderableType:
    now, wall = time.monotonic(), datetime.now(UTC)
    agents = view.agent_list()
    running = view.count(AgentState.RUNNING)
    header = Text.assemble(
        ("fabric top", "bold"),
        f"  {where}  {wall.astimezone().strftime('%H:%M:%S')}  ",
        f"{len(view.nodes)} nodes, {len(agents)} agents ({running} running)",
    )
    events = list(view.events)[-_SHOWN_EVENTS:]
    return Group(
        header,
        Text(""),
        _node_table(view.node_list(), now),
        Text(""),
        _agent_table(agents, wall),
        Text(""),
        _task_table(view.tasks),
        Text(""),
        _event_table(events),
    )


# --- running -------------------------------------------------------------------


def _top(args: argparse.Namespace) -> int:
    once = args.once or args.json or not is_tty()
    return run_cli(args, lambda client: _top_async(client, once, args.json))


async def _first_beats(view: FleetView, changed: asyncio.Event) -> None:
    """Until every known node has beaten once, or a moment has passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_FIRST_BEATS):
            while any(n.beat is None for n in view.nodes.values()):
                changed.clear()
                await changed.wait()


async def _top_async(client: FabricClient, once: bool, as_json: bool) -> int:
    view = FleetView()
    changed = asyncio.Event()
    view.listeners.append(lambda _change: changed.set())
    async with follow(client, view, tasks=True):
        if once:
            await _first_beats(view, changed)
            if as_json:
                print_json(view.snapshot())
            else:
                console = Console(width=max(120, Console().width), highlight=False)
                with console.capture() as captured:
                    console.print(render(view, client.env.url))
                lines = (line.rstrip() for line in captured.get().splitlines())
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            return 0
        await _live(view, changed, client.env.url)
    return 0


@contextlib.contextmanager
def _keys(quit_: asyncio.Event) -> Iterator[None]:
    """``q`` quits: stdin in cbreak mode, read by the loop (no thread)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_key() -> None:
        with contextlib.suppress(OSError):
            if os.read(fd, 32).strip().lower().startswith(b"q"):
                quit_.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _live(view: FleetView, changed: asyncio.Event, where: str) -> None:
    from rich.live import Live

    loop = asyncio.get_running_loop()
    quit_ = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, quit_.set)
    try:
        with (
            _keys(quit_),
            Live(render(view, where), screen=True, auto_refresh=False) as live,
        ):
            while not quit_.is_set():
                changed.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (changed, quit_)]
                try:
                    await asyncio.wait(waits, timeout=_REDRAW, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                live.update(render(view, where), refresh=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
