"""Listings: `fabric ps`, `fabric nodes`, `fabric version`.

`ps` is discovery (``fabric.discover`` what=agents): the controller's view,
fed by every node's statuses. `nodes` is discovery what=nodes plus one
heartbeat from each node (a short subscription to ``nodes.*.heartbeat``):
the registry knows who a node is, the heartbeat how it is doing right now
(CPU, memory, age). ``--json`` prints the contract's structs as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from fabric import __version__
from fabric.cli import CommandFailed
from fabric.cli.output import age, human_bytes, human_duration, print_json, print_table
from fabric.client import FabricClient, add_client_options, open_client, run_cli
from schemas import subjects
from schemas.agent import AgentState, AgentStatus
from schemas.codec import decode
from schemas.discovery import DiscoverRequest, NodeRecord
from schemas.errors import ContractError
from schemas.node import NodeHeartbeat, NodeMetrics

__all__ = ["NodeView", "register"]

_HIDDEN = frozenset({AgentState.STOPPED, AgentState.EXITED})
_UP = frozenset({AgentState.RUNNING, AgentState.PAUSED})


class NodeView(NodeRecord, frozen=True, kw_only=True):
    """A registry record with its latest heartbeat: ``last_heartbeat`` set, plus ``metrics``."""

    metrics: NodeMetrics | None = None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ps = subparsers.add_parser(
        "ps", help="list agents", description="List agents (running ones; -a for all)."
    )
    ps.add_argument("-a", "--all", action="store_true", help="include stopped and exited agents")
    ps.add_argument("--json", action="store_true", help="AgentStatus objects, as in the contract")
    add_client_options(ps)
    ps.set_defaults(handler=_ps)

    nodes = subparsers.add_parser("nodes", help="list nodes", description="List node agents.")
    nodes.add_argument("--json", action="store_true", help="NodeRecord objects plus metrics")
    add_client_options(nodes)
    nodes.set_defaults(handler=_nodes)

    version = subparsers.add_parser(
        "version", help="client and fabric versions", description="Show versions."
    )
    version.add_argument("--json", action="store_true")
    add_client_options(version)
    version.set_defaults(handler=_version)


# --- ps ------------------------------------------------------------------------


def _ps(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _ps_async(client, args.all, args.json))


async def _ps_async(client: FabricClient, show_all: bool, as_json: bool) -> int:
    reply = await client.discover(DiscoverRequest(what="agents", limit=10_000))
    agents = sorted(
        (a for a in reply.agents if show_all or a.state not in _HIDDEN),
        key=lambda a: (a.agent_id, a.node_id),
    )
    if as_json:
        print_json(agents)
        return 0
    now = datetime.now(UTC)
    rows = [_ps_row(a, now) for a in agents]
    headers = ("AGENT", "NODE", "STATE", "PID", "RESTARTS", "CPU", "MEM", "HEALTH", "UPTIME")
    print_table(headers, rows, styles=(2, 7))
    return 0


def _ps_row(a: AgentStatus, now: datetime) -> list[str]:
    m = a.metrics
    up = a.state in _UP
    return [
        a.agent_id,
        a.node_id,
        a.state.value,
        str(a.pid) if a.pid else "-",
        str(a.restarts),
        f"{m.cpu_percent:.1f}%" if m and up else "-",
        human_bytes(m.rss_bytes) if m and up else "-",
        a.health.value,
        human_duration(age(a.since, now)) if up else "-",
    ]


# --- nodes ---------------------------------------------------------------------


def _nodes(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _nodes_async(client, args.json))


async def _heartbeats(
    client: FabricClient, node_ids: set[str], wait: float
) -> dict[str, NodeHeartbeat]:
    """One heartbeat per node, or what came within ``wait`` seconds."""
    beats: dict[str, NodeHeartbeat] = {}
    all_in = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        try:
            beat = decode(msg.data, NodeHeartbeat, max_bytes=16 * 1024 * 1024)
        except ContractError:
            return
        beats[beat.node_id] = beat
        if node_ids <= beats.keys():
            all_in.set()

    sub = await client.nc.subscribe(subjects.ALL_HEARTBEATS, cb=on_beat)
    try:
        if node_ids:
            try:
                async with asyncio.timeout(wait):
                    await all_in.wait()
            except TimeoutError:
                pass  # a lost node sends none: show it without
    finally:
        await sub.unsubscribe()
    return beats


async def _nodes_async(client: FabricClient, as_json: bool) -> int:
    reply = await client.discover(DiscoverRequest(what="nodes", limit=10_000))
    # Nodes beat every second under `fabric up`; a little more covers one beat.
    beats = await _heartbeats(client, {n.info.node_id for n in reply.nodes}, wait=1.5)
    views = [_view(record, beats.get(record.info.node_id)) for record in reply.nodes]
    if as_json:
        print_json(views)
        return 0
    now = datetime.now(UTC)
    headers = (
        "NODE",
        "STATE",
        "HOSTNAME",
        "PID",
        "AGENTS",
        "CPU",
        "MEM",
        "HEARTBEAT AGE",
        "LABELS",
    )
    print_table(headers, [_node_row(v, now) for v in views], styles=(1,))
    return 0


def _view(record: NodeRecord, beat: NodeHeartbeat | None) -> NodeView:
    fields = msgspec.structs.asdict(record)
    if beat is not None:
        fields["last_heartbeat"] = beat.sent_at
        fields["metrics"] = beat.metrics
    return NodeView(**fields)


def _node_row(v: NodeView, now: datetime) -> list[str]:
    m = v.metrics
    mem = f"{human_bytes(m.memory_used_bytes)}/{human_bytes(m.memory_total_bytes)}" if m else "-"
    hb = age(v.last_heartbeat, now)
    labels = ",".join(f"{k}={val}" for k, val in sorted(v.info.labels.items()))
    return [
        v.info.node_id,
        v.state.value,
        v.info.hostname,
        str(v.info.pid),
        str(len(v.agents)),
        f"{m.cpu_percent:.1f}%" if m else "-",
        mem,
        f"{max(hb, 0.0):.1f}s" if hb is not None else "-",
        labels or "-",
    ]


# --- version -------------------------------------------------------------------


class Versions(msgspec.Struct, kw_only=True, omit_defaults=True):
    client: str
    nats_server: str | None = None
    url: str | None = None
    controllers: dict[str, str] = {}
    nodes: dict[str, str] = {}
    error: str | None = None


def _version(args: argparse.Namespace) -> int:
    versions = asyncio.run(_versions(args.state_dir))
    if args.json:
        print_json(versions)
        return 0
    print(f"client       {versions.client}")
    if versions.nats_server:
        print(f"nats-server  {versions.nats_server}  {versions.url}")
    for name, version in sorted(versions.controllers.items()):
        print(f"controller   {version}  {name}")
    for name, version in sorted(versions.nodes.items()):
        print(f"node         {version}  {name}")
    if versions.error:
        # The client's version is all that was asked for when no fabric runs.
        print(f"fabric: {versions.error}", file=sys.stderr)
    return 0


async def _versions(state_dir: str | None) -> Versions:
    versions = Versions(client=__version__)
    try:
        async with open_client(
            Path(state_dir) if state_dir else None, request_timeout=2.0
        ) as client:
            v = client.nc.connected_server_version
            versions.nats_server = f"{v.major}.{v.minor}.{v.patch}"
            versions.url = client.env.url
            versions.controllers = await _controller_versions(client)
            reply = await client.discover(DiscoverRequest(what="nodes", limit=10_000))
            versions.nodes = {n.info.node_id: n.info.version for n in reply.nodes}
    except CommandFailed as exc:
        versions.error = str(exc)
    return versions


async def _controller_versions(client: FabricClient) -> dict[str, str]:
    """Every controller's micro-service INFO (one reply each, gathered for a moment)."""
    found: dict[str, str] = {}
    inbox = client.nc.new_inbox()

    async def on_info(msg: Msg) -> None:
        try:
            info: dict[str, Any] = json.loads(msg.data)
        except ValueError:
            return
        name = str((info.get("metadata") or {}).get("controller") or info.get("id", "?"))
        found[name] = str(info.get("version", "?"))

    sub = await client.nc.subscribe(inbox, cb=on_info)
    try:
        await client.nc.publish("$SRV.INFO.fabric-controller", b"", reply=inbox)
        await client.nc.flush()
        await asyncio.sleep(0.3)
    except nats.errors.Error:
        pass
    finally:
        await sub.unsubscribe()
    return found
