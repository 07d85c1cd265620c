"""A live view of the fleet, kept by NATS subscriptions: what `fabric top` and the
dashboard show.

:class:`FleetView` is plain data with ``apply_*`` methods (no NATS, testable
alone); :func:`follow` seeds it with one discovery call per kind and then
keeps it current from three subscriptions, with no polling:

* ``agents.*.status``    - every state change and metrics tick of every agent;
* ``nodes.*.heartbeat``  - each node's metrics and the agents it runs (an
  agent its node no longer lists has been removed);
* ``events.>``           - through an ordered JetStream consumer on ``EVENTS``
  starting a few events back, so the feed opens with recent history; plain
  core subscription when the stream cannot be read.

With ``tasks=True`` (`fabric top`) it also keeps the task backlog per type
(discovery ``what=tasks``, answered by a controller from the queue and the
task records): asked again when a task event says something moved (at most
once a second), and every few seconds for tasks that wait without events.

Every change is handed to the listeners as a :class:`Change`, which the
dashboard forwards to its pages as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from fabric.cancelled import raise_if_cancelled
from fabric.cli import CommandFailed
from fabric.client import FabricClient
from fabric.controller.streams import EVENTS_STREAM
from schemas import subjects
from schemas.agent import AgentState, AgentStatus
from schemas.codec import decode, encode
from schemas.discovery import DiscoverReply, DiscoverRequest, NodeRecord, TaskBacklog
from schemas.errors import ContractError, ErrorReply
from schemas.event import CloudEvent
from schemas.node import NodeHeartbeat, NodeMetrics, NodeState

__all__ = ["Change", "FleetView", "NodeLive", "follow"]

log = logging.getLogger(__name__)

KEEP_EVENTS = 50
SILENT_AFTER = 5.0
"""Seconds without a heartbeat after which a node is shown as silent."""
_GONE_AFTER = 2.0
"""An agent its node's heartbeat omits is gone once its last status is this old."""
_MAX_HEARTBEAT = 16 * 1024 * 1024
_TASKS_EVERY = 5.0
"""Seconds between backlog refreshes when no task event asks for one."""
_TASKS_GAP = 1.0
"""The shortest time between two backlog refreshes (task events come in floods)."""


@dataclass(slots=True)
class NodeLive:
    """One node: its registry record (from discovery) and its latest heartbeat."""

    node_id: str
    record: NodeRecord | None = None
    beat: NodeHeartbeat | None = None
    beat_at: float | None = None
    """time.monotonic() when the latest heartbeat arrived."""
    state: str = "unknown"

    @property
    def metrics(self) -> NodeMetrics | None:
        return self.beat.metrics if self.beat else None

    def shown_state(self, now: float) -> str:
        if self.state == NodeState.LOST.value:
            return self.state
        if self.beat_at is not None and now - self.beat_at > SILENT_AFTER:
            return "silent"
        return self.state

    def to_builtins(self, now: float) -> dict[str, Any]:
        info = self.record.info if self.record else None
        m = self.metrics
        return {
            "node_id": self.node_id,
            "state": self.shown_state(now),
            "hostname": info.hostname if info else None,
            "pid": (self.beat.pid if self.beat else None) or (info.pid if info else None),
            "cpus": info.resources.cpus if info else None,
            "memory_bytes": info.resources.memory_bytes if info else None,
            "labels": dict(info.labels) if info else {},
            "agents": len(self.beat.agents) if self.beat else None,
            "metrics": msgspec.to_builtins(m) if m else None,
            "heartbeat_age": None if self.beat_at is None else round(now - self.beat_at, 1),
        }


@dataclass(frozen=True, slots=True)
class Change:
    """What changed: ``kind`` is ``agent``, ``agent_removed``, ``node``, ``event`` or
    ``tasks`` (the whole backlog list)."""

    kind: str
    data: Any
    """JSON-ready builtins: an AgentStatus, ``{"agent_id": ...}``, a node, a CloudEvent."""


Listener = Callable[[Change], None]


@dataclass(slots=True)
class FleetView:
    """Nodes, agents and recent events; listeners hear of every change."""

    nodes: dict[str, NodeLive] = field(default_factory=dict)
    agents: dict[str, AgentStatus] = field(default_factory=dict)
    events: deque[CloudEvent] = field(default_factory=lambda: deque(maxlen=KEEP_EVENTS))
    tasks: list[TaskBacklog] = field(default_factory=list)
    """The task backlog per type (followed only when asked for: ``follow(tasks=True)``)."""
    listeners: list[Listener] = field(default_factory=list)
    _status_at: dict[str, float] = field(default_factory=dict)

    # --- changes ----------------------------------------------------------------

    def _tell(self, kind: str, data: Any) -> None:
        change = Change(kind, data)
        for listener in list(self.listeners):
            listener(change)

    def seed(self, nodes: list[NodeRecord], agents: list[AgentStatus]) -> None:
        now = time.monotonic()
        for record in nodes:
            node = self.nodes.setdefault(record.info.node_id, NodeLive(record.info.node_id))
            node.record = record
            node.state = record.state.value
            self._tell("node", node.to_builtins(now))
        for status in agents:
            self.apply_status(status)

    def apply_status(self, status: AgentStatus) -> bool:
        """Keep the newest copy of each agent (a re-placed one has a higher epoch)."""
        old = self.agents.get(status.agent_id)
        if (
            old is not None
            and old.node_id != status.node_id
            and (status.epoch, status.since) < (old.epoch, old.since)
        ):
            return False  # a stale copy on the node it left
        self.agents[status.agent_id] = status
        self._status_at[status.agent_id] = time.monotonic()
        self._tell("agent", msgspec.to_builtins(status))
        return True

    def apply_heartbeat(self, beat: NodeHeartbeat) -> None:
        now = time.monotonic()
        node = self.nodes.setdefault(beat.node_id, NodeLive(beat.node_id))
        node.beat, node.beat_at = beat, now
        if node.state in ("unknown", NodeState.LOST.value, NodeState.SUSPECT.value):
            node.state = NodeState.READY.value
        if beat.draining:
            node.state = NodeState.DRAINING.value
        self._tell("node", node.to_builtins(now))
        listed = {a.agent_id: a for a in beat.agents}
        for agent_id, status in list(self.agents.items()):
            if status.node_id != beat.node_id or agent_id in listed:
                continue
            if now - self._status_at.get(agent_id, 0.0) > _GONE_AFTER:
                del self.agents[agent_id]
                self._status_at.pop(agent_id, None)
                self._tell("agent_removed", {"agent_id": agent_id})
        for agent_id, summary in listed.items():
            if agent_id not in self.agents:
                self.apply_status(
                    AgentStatus(
                        agent_id=agent_id,
                        node_id=beat.node_id,
                        state=summary.state,
                        since=beat.sent_at,
                        pid=summary.pid,
                        epoch=summary.epoch,
                    )
                )

    def apply_event(self, event: CloudEvent) -> None:
        self.events.append(event)
        self._tell("event", msgspec.to_builtins(event))
        kind = event.kind
        if kind in ("node.lost", "node.recovered") and event.subject in self.nodes:
            node = self.nodes[event.subject]
            node.state = NodeState.LOST.value if kind == "node.lost" else NodeState.READY.value
            self._tell("node", node.to_builtins(time.monotonic()))

    def apply_tasks(self, tasks: list[TaskBacklog]) -> None:
        if tasks != self.tasks:
            self.tasks = tasks
            self._tell("tasks", msgspec.to_builtins(tasks))

    # --- reading ----------------------------------------------------------------

    def agent_list(self) -> list[AgentStatus]:
        return sorted(self.agents.values(), key=lambda a: a.agent_id)

    def node_list(self) -> list[NodeLive]:
        return [self.nodes[k] for k in sorted(self.nodes)]

    def count(self, state: AgentState) -> int:
        return sum(1 for a in self.agents.values() if a.state is state)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "nodes": [n.to_builtins(now) for n in self.node_list()],
            "agents": [msgspec.to_builtins(a) for a in self.agent_list()],
            "events": [msgspec.to_builtins(e) for e in self.events],
            "tasks": [msgspec.to_builtins(t) for t in self.tasks],
        }


# --- NATS ----------------------------------------------------------------------


async def _discover(client: FabricClient, what: str) -> DiscoverReply:
    request = DiscoverRequest(what=what, limit=10_000)  # type: ignore[arg-type]
    if client.env.token_key is not None:
        return await client.discover(request)
    # A viewer without the signing key: discovery is read-only and asks no token.
    data = await client.request(subjects.DISCOVER, encode(request), what="controller", within=None)
    try:
        reply: Any = decode(data, DiscoverReply | ErrorReply, max_bytes=64 << 20)  # type: ignore[arg-type]
    except ContractError as exc:
        raise CommandFailed(f"bad reply from the controller: {exc}") from None
    if isinstance(reply, ErrorReply):
        raise CommandFailed(f"discovery refused: {reply.message}")
    assert isinstance(reply, DiscoverReply)
    return reply


async def _events_subscription(nc: Client, cb: Callable[[Msg], Any], back: int) -> Any:
    """The ordered consumer from ``back`` events ago, else a core subscription."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(EVENTS_STREAM)
        start = max(1, info.state.last_seq - back + 1)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        return await js.subscribe(
            subjects.ALL_EVENTS,
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            config=config,
            cb=cb,
        )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        log.info("no replay of EVENTS (%s): live events only", exc)
        return await nc.subscribe(subjects.ALL_EVENTS, cb=cb)


async def refresh_tasks(client: FabricClient, view: FleetView) -> bool:
    """Ask for the task backlog once; False when no controller could say (an older
    one refuses ``what=tasks``, or none answered): the view keeps what it had."""
    try:
        reply = await _discover(client, "tasks")
    except CommandFailed as exc:
        log.info("no task backlog: %s", exc)
        return False
    view.apply_tasks(reply.tasks)
    return True


async def _follow_tasks(client: FabricClient, view: FleetView, due: asyncio.Event) -> None:
    while True:
        raise_if_cancelled()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TASKS_EVERY):
                await due.wait()
        due.clear()
        await refresh_tasks(client, view)
        await asyncio.sleep(_TASKS_GAP)  # a flood of task events: one refresh a second


@contextlib.asynccontextmanager
async def follow(
    client: FabricClient, view: FleetView, *, back: int = 20, tasks: bool = False
) -> AsyncIterator[None]:
    """Subscribe, seed ``view`` from discovery, and keep it current until the block ends.

    Subscriptions come first, so nothing between the seed and the first
    message is missed; a status older than the seed's is simply newer news
    for the same agent.
    """
    nc = client.nc

    async def on_status(msg: Msg) -> None:
        with contextlib.suppress(ContractError):
            view.apply_status(decode(msg.data, AgentStatus))

    async def on_beat(msg: Msg) -> None:
        with contextlib.suppress(ContractError):
            view.apply_heartbeat(decode(msg.data, NodeHeartbeat, max_bytes=_MAX_HEARTBEAT))

    due = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        with contextlib.suppress(ContractError):
            event = decode(msg.data, CloudEvent)
            view.apply_event(event)
            if event.kind.startswith("task.") and event.kind != "task.progress":
                due.set()  # a task settled or moved: the backlog changed

    subs = [
        await nc.subscribe(subjects.ALL_AGENT_STATUS, cb=on_status),
        await nc.subscribe(subjects.ALL_HEARTBEATS, cb=on_beat),
    ]
    try:
        await nc.flush()
        nodes = await _discover(client, "nodes")
        agents = await _discover(client, "agents")
        view.seed(nodes.nodes, [a for a in agents.agents if a.agent_id not in view.agents])
        subs.append(await _events_subscription(nc, on_event, back))
        follower = None
        if tasks:
            await refresh_tasks(client, view)
            follower = asyncio.create_task(_follow_tasks(client, view, due))
        try:
            yield
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
