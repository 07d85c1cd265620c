"""The controller's NATS face: a thin adapter around the pure decisions.

Every controller (queue group ``fabric-controllers``, micro service
``fabric-controller``) answers:

* ``nodes.<node_id>.register`` - records the node (KV, compare-and-set) and
  replies with the agents it should run and their epochs. The subject's
  node id is trusted: the server lets a node publish only under its own.
* ``fabric.discover`` - nodes and agents from the local view; the task
  backlog per type from stream TASKS and the task records
  (:mod:`fabric.tasks.backlog`).
* ``fabric.api.<method>`` - the operator API (see :mod:`schemas.api`); a
  mutation is a compare-and-set write of the desired state in KV, which the
  leader's loop then carries out.

Every controller also listens (no queue group) to heartbeats and agent
statuses, so each has the live view discovery needs. Only the lease holder
runs the loop: liveness -> ``events.node.lost``; :func:`reconcile` -> record
writes (CAS; a conflict drops that deployment's commands until the next
pass), then ``PlaceAgent`` / ``RemoveAgent`` requests with tokens minted from
the controller's key, retried with backoff.

The leader also stores what nodes report running in ``fabric_observed``,
coarsely (per node, on change only; see :mod:`~fabric.controller.observed`),
so a controller that has just started knows it before the first heartbeat.

A pass is two steps, :meth:`Controller.plan_pass` (decide, from the local
view) and :meth:`Controller.carry_out` (write, command, publish). Every write
of the second step is fenced by the lease (:meth:`Lease.fence` right before
it), and so is the first command it sends: a leader deposed between the two
steps (paused, cut off, its key taken) raises :class:`NotLeader` and leaves
the registry and the nodes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request

from fabric import __version__
from fabric.audit import Refusal, RefusalAudit
from fabric.cancelled import raise_if_cancelled
from fabric.connect import js_publish
from fabric.controller.lease import Lease, NotLeader
from fabric.controller.liveness import LivenessConfig, NodeFlags, node_state
from fabric.controller.observed import ObservedEntry, changes
from fabric.controller.placement import NodeSnapshot
from fabric.controller.reconcile import (
    Command,
    DeploymentPlan,
    Event,
    ObservedNode,
    Place,
    Plan,
    Snapshot,
    reconcile,
)
from fabric.controller.registry import Guard, Mirror, NodeEntry, delete, mutate, read, write
from fabric.controller.streams import Buckets, StreamSettings, ensure_state
from fabric.spec_policy import check_spec
from fabric.tasks.admission import Admission, attach
from fabric.tasks.backlog import RecordCounts, backlog_report, queue_backlog
from fabric.tasks.dispatch import Dispatcher
from fabric.tokens import Claims, TokenIssuer, TokenVerifier
from schemas import subjects
from schemas.agent import AgentStatus
from schemas.api import (
    API_METHODS,
    ApiResult,
    CreateDeployment,
    DeleteDeployment,
    Deployment,
    DeploymentRecord,
    GetDeployment,
    ListDeployments,
    NodeRequest,
    ScaleDeployment,
    UpdateDeployment,
    replica_ids,
)
from schemas.codec import decode, decode_reply, encode
from schemas.command import CommandResult, PlaceAgent, RemoveAgent
from schemas.common import utc_now
from schemas.discovery import DiscoverReply, DiscoverRequest, NodeRecord
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.event import make_event
from schemas.node import (
    AgentSummary,
    NodeHeartbeat,
    NodeState,
    Placement,
    RegisterReply,
    RegisterRequest,
)

__all__ = ["QUEUE_GROUP", "Controller", "ControllerConfig", "Pass"]

log = logging.getLogger(__name__)

QUEUE_GROUP = "fabric-controllers"
_WRITE_CHUNK = 64
"""Registry writes a pass sends at once, each batch right after a lease fence."""
_QUIET_PASS_EVERY = 1.0
"""Seconds between passes while nothing a pass reads has changed."""
_MAX_REQUEST = 1024 * 1024
_METHOD_SCOPES = {
    "create": "agents:run",
    "update": "agents:run",
    "scale": "agents:run",
    "delete": "agents:stop",
    "get": "read",
    "list": "read",
    "drain": "nodes:admin",
    "cordon": "nodes:admin",
    "uncordon": "nodes:admin",
}


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    name: str
    """This controller's identity: the lease holder and the events' source."""
    signing_key: Path
    """Mints the tokens of the controller's own place/remove commands."""
    verify_keys: tuple[Path, ...]
    """Public keys operator tokens are checked against."""
    heartbeat_interval: float = 0.5
    node_timeout: float = 1.5
    lease_ttl: float = 3.0
    reconcile_interval: float = 0.25
    placement_budget: int = 100_000
    """Nodes a pass may look at while searching placements (about 50 ms of work)."""
    command_timeout: float = 2.0
    command_token_ttl: float = 30.0
    allow_root_agents: bool = False
    """Admit specs whose user or group is named root (nodes check again, by uid)."""
    streams: StreamSettings = field(default_factory=StreamSettings)
    require_submit_token: bool = False
    """Refuse tasks that carry no submit token (fabric.tasks.admission). Off here
    so a controller built in code accepts the SDK's untokened tasks; `fabric
    controller run` (and so `fabric up`) turns it on."""


@dataclass(frozen=True, slots=True)
class Pass:
    """What one reconcile pass decided, before anything is written or sent."""

    plan: Plan
    marks: dict[str, bool] = field(default_factory=dict)
    """Nodes whose ``lost`` flag must change: node id -> lost."""
    observed: dict[str, list[AgentSummary]] = field(default_factory=dict)
    """Nodes whose reported agents differ from ``fabric_observed``."""


@dataclass(frozen=True, slots=True)
class _View:
    nodes: list[tuple[NodeEntry, NodeState, dict[str, AgentSummary]]]
    deployments: dict[str, tuple[DeploymentRecord, int]]
    live: dict[str, dict[str, AgentSummary]]
    stored: dict[str, ObservedEntry]


def _decide(view: _View, budget: int | None) -> Pass:
    """A pass's decisions from its view. Pure, so it may run in a worker thread."""
    observed: dict[str, ObservedNode] = {}
    marks: dict[str, bool] = {}
    for entry, state, reported in view.nodes:
        info = entry.info
        lost = state is NodeState.LOST
        if lost != entry.lost:
            # Not lost with the flag set means a heartbeat came back: a flagged
            # node gets no grace from a new leader (see Controller._state_of).
            marks[info.node_id] = lost
        snapshot = NodeSnapshot(
            info.node_id,
            state,
            info.labels,
            frozenset(info.capabilities),
            info.resources.cpus,
            info.resources.memory_bytes,
        )
        observed[info.node_id] = ObservedNode(snapshot, reported)
    plan = reconcile(Snapshot(view.deployments, observed), budget=budget)
    return Pass(plan, marks, changes(view.live, view.stored))


@dataclass(slots=True)
class _Live:
    """What the latest heartbeat (or registration) said, and when it arrived."""

    last_seen: float
    agents: dict[str, AgentSummary]
    draining: bool = False


@dataclass(slots=True)
class _Try:
    next_at: float = 0.0
    tries: int = 0
    inflight: bool = False
    done_at: float | None = None


class _Retries:
    """Which commands to send now: not in flight, not just done, backoff elapsed.

    A command is keyed by what it asks (op, node, agent, epoch); once done it
    is not resent for ``hold`` seconds, enough for the node's heartbeat to
    show the effect, after which reconcile stops asking for it.
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.tries: dict[tuple[str, str, str, int], _Try] = {}

    @staticmethod
    def key(command: Command) -> tuple[str, str, str, int]:
        op = "place" if isinstance(command, Place) else "remove"
        return (op, command.node_id, command.agent_id, command.epoch)

    def due(self, command: Command, now: float) -> bool:
        t = self.tries.setdefault(self.key(command), _Try())
        if t.inflight or now < t.next_at:
            return False
        return t.done_at is None or now - t.done_at > self.hold

    def forget_except(self, wanted: set[tuple[str, str, str, int]]) -> None:
        for key in [k for k, t in self.tries.items() if k not in wanted and not t.inflight]:
            del self.tries[key]


def _status_from_heartbeat(node_id: str, summary: AgentSummary) -> AgentStatus:
    return AgentStatus(
        agent_id=summary.agent_id,
        node_id=node_id,
        state=summary.state,
        since=utc_now(),
        pid=summary.pid,
        epoch=summary.epoch,
    )


class Controller:
    """One controller process on one NATS connection; :meth:`run` until cancelled."""

    def __init__(self, nc: Client, config: ControllerConfig) -> None:
        self.nc = nc
        self.config = config
        self.js = nc.jetstream()
        self.liveness = LivenessConfig(node_timeout=config.node_timeout)
        self.issuer = TokenIssuer.from_file(config.signing_key, config.name)
        self.verifier = TokenVerifier.from_files(*config.verify_keys)
        self.source = f"/controllers/{config.name}"
        self.live: dict[str, _Live] = {}
        self.statuses: dict[str, dict[str, AgentStatus]] = {}
        self.node_states: dict[str, NodeState] = {}
        self._live_version = 0
        self._last_pass: tuple[float, tuple[int, ...]] | None = None
        self.refused: Counter[str] = Counter()
        self.api_calls: Counter[str] = Counter()  # by method, for fabric.prometheus
        self.published: Counter[str] = Counter()  # events by kind, for fabric.prometheus
        # Refused requests go to events.controller.refused, at most 10/s.
        self.audit = RefusalAudit(
            lambda data, actor: self._publish("controller.refused", config.name, data, actor)
        )
        self.started = asyncio.Event()
        self._retries = _Retries(hold=2 * config.node_timeout)
        self._led_since: float | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._buckets: Buckets | None = None
        self.lease: Lease | None = None
        self.nodes: Mirror[NodeEntry] | None = None
        self.deployments: Mirror[DeploymentRecord] | None = None
        self.observed: Mirror[ObservedEntry] | None = None
        self.task_counts: RecordCounts | None = None
        """Started by the first what=tasks discovery (see fabric.tasks.backlog)."""

    # --- lifecycle ---------------------------------------------------------

    async def _ensure_state(self) -> Buckets:
        # A controller often starts with its servers: JetStream answers only
        # once a meta leader is elected, so wait for it rather than exit.
        delay = 0.25
        while True:
            raise_if_cancelled()
            try:
                return await ensure_state(self.nc, self.js, self.config.streams)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("JetStream not ready (%s); retrying in %.2fs", exc or type(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self) -> None:
        buckets = await self._ensure_state()
        self._buckets = buckets
        self.nodes = Mirror(buckets.nodes, NodeEntry)
        self.deployments = Mirror(buckets.agents, DeploymentRecord)
        self.observed = Mirror(buckets.observed, ObservedEntry)
        self.lease = Lease(
            buckets.lease, self.config.name, ttl=self.config.lease_ttl, on_change=self._on_lead
        )
        service = None
        subs = []
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.nodes.run())
                tg.create_task(self.deployments.run())
                tg.create_task(self.observed.run())
                async with asyncio.timeout(10):
                    await self.nodes.ready.wait()
                    await self.deployments.ready.wait()
                    await self.observed.ready.wait()
                subs.append(await self.nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat))
                subs.append(await self.nc.subscribe(subjects.ALL_AGENT_STATUS, cb=self._on_status))
                service = await self._serve()
                await self.nc.flush()
                tg.create_task(self.lease.run())
                tg.create_task(self._loop())
                # Task queues: every controller dispatches (issue 5).
                self.dispatcher = Dispatcher.for_controller(self)
                attach(
                    self.dispatcher,
                    Admission.from_files(
                        *self.config.verify_keys,
                        require_token=self.config.require_submit_token,
                        on_refused=self._task_refused,
                    ),
                )
                tg.create_task(self.dispatcher.run())
                self.started.set()
        finally:
            self._tg = None
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()

    async def _serve(self) -> nats.micro.Service:
        service = await nats.micro.add_service(
            self.nc,
            name="fabric-controller",
            version=__version__,
            description="agent-fabric controller",
            metadata={"controller": self.config.name},
            stats_handler=lambda _e: {
                "refused": dict(self.refused),
                "audit_suppressed": self.audit.suppressed,
            },
        )
        endpoints: list[tuple[str, str, Callable[[Request], Awaitable[None]]]] = [
            ("register", subjects.ALL_REGISTRATIONS, self._on_register),
            ("discover", subjects.DISCOVER, self._on_discover),
            ("api", f"{subjects.API_PREFIX}.*", self._on_api),
        ]
        for name, subject, handler in endpoints:
            await service.add_endpoint(
                name=name, subject=subject, handler=handler, queue_group=QUEUE_GROUP
            )
        return service

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._tg is None:
            coro.close()
            return
        try:
            self._tg.create_task(coro)
        except RuntimeError:
            coro.close()  # the group is shutting down: nothing new starts

    async def _on_lead(self, leader: bool) -> None:
        loop = asyncio.get_running_loop()
        # A new leader has seen no heartbeat yet: give every node one timeout
        # of grace instead of declaring the whole fleet lost.
        self._led_since = loop.time() if leader else None
        self.node_states.clear()
        self._retries.tries.clear()
        self._last_pass = None
        if leader:
            self._publish(
                "controller.leader",
                self.config.name,
                {
                    "leader": self.config.name,
                    "lease_revision": self.lease.revision if self.lease else None,
                },
            )

    def _publish(self, kind: str, subject: str, data: Any, actor: str | None = None) -> None:
        event = make_event(kind, source=self.source, subject=subject, data=data, actor=actor)
        self.published[kind] += 1
        self._spawn(self._send_event(kind, event))

    async def _send_event(self, kind: str, event: Any) -> None:
        try:
            await js_publish(
                self.js, subjects.event(kind), encode(event), msg_id=event.id, deadline=10.0
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("event %s not stored: %s", kind, exc)

    # --- protocol face -----------------------------------------------------

    async def _answer(self, req: Request, work: Callable[[], Awaitable[msgspec.Struct]]) -> None:
        try:
            reply: msgspec.Struct = await work()
        except ContractError as exc:
            self.refused[exc.code.value] += 1
            self._audit(req, exc.code)
            reply = exc.to_reply()
        except (nats.js.errors.ServiceUnavailableError, TimeoutError) as exc:
            # JetStream is electing a leader or a server is going: nothing was
            # changed, and every request here is safe to repeat.
            log.warning("request on %s: JetStream unavailable (%s)", req.subject, exc)
            self.refused[ErrorCode.UNAVAILABLE.value] += 1
            reply = ErrorReply(
                code=ErrorCode.UNAVAILABLE,
                message="JetStream is temporarily unavailable (leader election); retry",
            )
        except Exception:
            log.exception("request on %s failed", req.subject)
            self.refused[ErrorCode.INTERNAL.value] += 1
            reply = ErrorReply(code=ErrorCode.INTERNAL, message="internal error")
        with contextlib.suppress(ValueError, nats.errors.Error):
            await req.respond(encode(reply))

    def _audit(self, req: Request, code: ErrorCode) -> None:
        """Tell the event stream who was refused what (rate-limited by ``self.audit``)."""
        subject = req.subject
        tokens = subject.split(".")
        target = None
        if subject == subjects.DISCOVER:
            op = "discover"
        elif subject.startswith(f"{subjects.API_PREFIX}."):
            op = tokens[-1]
        else:  # nodes.<node_id>.register: the subject names the node
            op = tokens[-1]
            target = tokens[1] if len(tokens) == 3 else None
        self.audit(Refusal.of(code, subject, req.data, op=op, target=target))

    def _task_refused(self, refusal: Refusal) -> None:
        """A task the admission refused: counted and audited like a refused request."""
        self.refused[refusal.code.value] += 1
        self.audit(refusal)

    async def _on_register(self, req: Request) -> None:
        await self._answer(req, lambda: self._register(req.subject, req.data))

    async def _on_discover(self, req: Request) -> None:
        await self._answer(req, lambda: self._discover(req.data))

    async def _on_api(self, req: Request) -> None:
        await self._answer(req, lambda: self._api(req.subject, req.data))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            node_id = subjects.parse_subject(msg.subject).id
            beat = decode(msg.data, NodeHeartbeat, max_bytes=16 * _MAX_REQUEST)
        except ContractError as exc:
            self.refused[exc.code.value] += 1
            return
        if beat.node_id != node_id:
            self.refused[ErrorCode.INVALID_PAYLOAD.value] += 1
            return
        agents = {a.agent_id: a for a in beat.agents}
        before = self.live.get(node_id)
        if before is None or before.agents != agents or before.draining != beat.draining:
            self._live_version += 1
        self.live[node_id] = _Live(
            last_seen=asyncio.get_running_loop().time(),
            agents=agents,
            draining=beat.draining,
        )

    async def _on_status(self, msg: Msg) -> None:
        try:
            agent_id = subjects.parse_subject(msg.subject).id
            status = decode(msg.data, AgentStatus, max_bytes=_MAX_REQUEST)
        except ContractError as exc:
            self.refused[exc.code.value] += 1
            return
        if status.agent_id != agent_id:
            self.refused[ErrorCode.INVALID_PAYLOAD.value] += 1
            return
        self.statuses.setdefault(agent_id, {})[status.node_id] = status

    # --- registration and discovery -----------------------------------------

    async def _register(self, subject: str, data: bytes) -> RegisterReply:
        parsed = subjects.parse_subject(subject)
        node_id = parsed.id
        assert node_id is not None
        request = decode(data, RegisterRequest, max_bytes=16 * _MAX_REQUEST)
        if request.node.node_id != node_id:
            raise ContractError(
                ErrorCode.INVALID_PAYLOAD,
                f"node {request.node.node_id!r} cannot register on {subject!r}",
            )
        buckets = self._require_buckets()

        def record(current: NodeEntry | None) -> NodeEntry:
            flags = {"cordoned": current.cordoned, "draining": current.draining} if current else {}
            return NodeEntry(info=request.node, registered_at=utc_now(), lost=False, **flags)

        result = await mutate(buckets.nodes, node_id, NodeEntry, record)
        if result.value is not None and result.revision is not None:
            self._require(self.nodes).apply(node_id, result.value, result.revision)
        self.live[node_id] = _Live(
            last_seen=asyncio.get_running_loop().time(),
            agents={a.agent_id: a for a in request.agents},
        )
        self._live_version += 1
        return RegisterReply(
            node_id=node_id,
            agents=self._placements_on(node_id),
            heartbeat_interval=self.config.heartbeat_interval,
            node_timeout=self.config.node_timeout,
        )

    def _placements_on(self, node_id: str) -> list[Placement]:
        out = []
        for record, _ in self._require(self.deployments).items.values():
            for p in record.replicas:
                if p.node_id == node_id and not p.failed:
                    spec = msgspec.structs.replace(record.deployment.spec, name=p.agent_id)
                    out.append(Placement(spec, p.epoch))
        return sorted(out, key=lambda p: p.spec.name)

    def _reported(self, node_id: str) -> dict[str, AgentSummary]:
        """What the node runs: its last heartbeat, or else what the leader stored."""
        live = self.live.get(node_id)
        if live is not None:
            return live.agents
        stored = self.observed.items.get(node_id) if self.observed else None
        return {a.agent_id: a for a in stored[0].agents} if stored else {}

    def _node_record(self, node_id: str, entry: NodeEntry) -> NodeRecord:
        return NodeRecord(
            info=entry.info,
            state=self._state_of(node_id, entry),
            agents=sorted(self._reported(node_id)),
        )

    def _state_of(self, node_id: str, entry: NodeEntry) -> NodeState:
        live = self.live.get(node_id)
        now = asyncio.get_running_loop().time()
        last_seen = live.last_seen if live else None
        if last_seen is None and not entry.lost and self._led_since is not None:
            last_seen = self._led_since
        flags = NodeFlags(
            cordoned=entry.cordoned, draining=entry.draining or bool(live and live.draining)
        )
        return node_state(last_seen, now, flags, self.liveness)

    async def _discover(self, data: bytes) -> DiscoverReply:
        request = decode(data, DiscoverRequest, max_bytes=_MAX_REQUEST)
        ids = set(request.ids)
        if request.what == "tasks":
            return await self._discover_tasks(request, ids)
        if request.what == "nodes":
            known = self._require(self.nodes).items
            # Cheap filters first; a record (state, agents) only for what passes them.
            nodes: list[NodeRecord] = []
            for node_id in sorted(ids & known.keys() if ids else known):
                entry = known[node_id][0]
                info = entry.info
                if any(info.labels.get(k) != v for k, v in request.labels.items()) or (
                    request.capability and request.capability not in info.capabilities
                ):
                    continue
                if request.state and self._state_of(node_id, entry).value != request.state:
                    continue
                nodes.append(self._node_record(node_id, entry))
            return DiscoverReply(
                nodes=nodes[: request.limit],
                truncated=len(nodes) > request.limit,
                answered_by=self.config.name,
            )
        agents = self._discover_agents(request, ids)
        return DiscoverReply(
            agents=agents[: request.limit],
            truncated=len(agents) > request.limit,
            answered_by=self.config.name,
        )

    async def _discover_tasks(self, request: DiscoverRequest, ids: set[str]) -> DiscoverReply:
        stored = await queue_backlog(self.js)
        counts = self.task_counts
        if counts is None:
            counts = self.task_counts = RecordCounts(self.js)
            self._spawn(counts.run())
        # The first answer waits for the stored records (bounded); later ones never do.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await counts.ready.wait()
        tasks = backlog_report(stored or {}, counts, ids or None)
        return DiscoverReply(
            tasks=tasks[: request.limit],
            truncated=len(tasks) > request.limit,
            answered_by=self.config.name,
        )

    def _discover_agents(self, request: DiscoverRequest, ids: set[str]) -> list[AgentStatus]:
        out: list[AgentStatus] = []
        known = self._require(self.deployments).items
        if ids:
            # A replica id is its deployment's name, or the name and "-<index>".
            names = {n for i in ids for n in (i, i.rpartition("-")[0]) if n in known}
        else:
            names = set(known)
        for name in sorted(names):
            record = known[name][0]
            spec = record.deployment.spec
            if any(spec.labels.get(k) != v for k, v in request.labels.items()):
                continue
            if request.capability and request.capability not in spec.capabilities:
                continue
            for p in record.replicas:
                if (ids and p.agent_id not in ids) or p.node_id is None:
                    continue
                status = self.statuses.get(p.agent_id, {}).get(p.node_id)
                if status is None:
                    summary = self._reported(p.node_id).get(p.agent_id)
                    if summary is not None:
                        status = _status_from_heartbeat(p.node_id, summary)
                if status is None or (request.state and status.state.value != request.state):
                    continue
                out.append(status)
        return out

    # --- operator API ------------------------------------------------------

    async def _api(self, subject: str, data: bytes) -> ApiResult:
        method = subject.rsplit(".", 1)[-1]
        type_ = API_METHODS.get(method)
        if type_ is None:
            raise ContractError(
                ErrorCode.UNKNOWN_OP,
                f"unknown API method {method[:40]!r}; known: {', '.join(API_METHODS)}",
            )
        self.api_calls[method] += 1
        request: Any = decode(data, type_, max_bytes=_MAX_REQUEST)
        target_agent = None
        target_node = None
        if isinstance(request, CreateDeployment | UpdateDeployment):
            target_agent = request.deployment.name
        elif isinstance(request, ScaleDeployment | DeleteDeployment | GetDeployment):
            target_agent = request.name
        elif isinstance(request, NodeRequest):
            target_node = request.node_id
        claims = self.verifier.verify(
            request.token, scope=_METHOD_SCOPES[method], agent=target_agent, node=target_node
        )
        if isinstance(request, NodeRequest):
            return await self._node_api(method, request, claims)
        return await self._deployment_api(method, request, claims)

    async def _deployment_api(self, method: str, request: Any, claims: Claims) -> ApiResult:
        kv = self._require_buckets().agents
        if isinstance(request, ListDeployments):
            records = [r for r, _ in self._require(self.deployments).items.values()]
            return ApiResult(method=method, deployments=sorted(records, key=lambda r: r.name))
        if isinstance(request, GetDeployment):
            found = await read(kv, request.name, DeploymentRecord)
            if found is None:
                raise _not_found("deployment", request.name)
            return ApiResult(method=method, deployments=[found[0]])
        name = request.deployment.name if hasattr(request, "deployment") else request.name
        if isinstance(request, CreateDeployment | UpdateDeployment):
            # Spec abuse is refused here, at `fabric run` time; nodes check again.
            check_spec(request.deployment.spec, allow_root_agents=self.config.allow_root_agents)
        if isinstance(request, CreateDeployment):
            self._check_ids_free(request.deployment)
        change = _CHANGES[type(request)]
        value, revision, changed = await mutate(
            kv, name, DeploymentRecord, lambda cur: change(cur, request, claims)
        )
        if revision is not None:
            self._require(self.deployments).apply(name, value, revision)
        if changed:
            kind = {
                "create": "created",
                "update": "updated",
                "scale": "scaled",
                "delete": "deleted",
            }
            self._publish(f"deployment.{kind[method]}", name, {"method": method}, claims.sub)
        return ApiResult(
            method=method, changed=changed, deployments=[value] if value is not None else []
        )

    def _check_ids_free(self, deployment: Deployment) -> None:
        wanted = set(replica_ids(deployment.name, max(deployment.replicas, 1)))
        for other, _ in self._require(self.deployments).items.values():
            if other.name == deployment.name:
                continue
            taken = set(replica_ids(other.name, max(other.deployment.replicas, 1)))
            taken |= {p.agent_id for p in other.replicas}
            if wanted & taken:
                raise ContractError(
                    ErrorCode.CONFLICT,
                    f"agent ids of {deployment.name!r} overlap deployment {other.name!r}",
                )

    async def _node_api(self, method: str, request: NodeRequest, claims: Claims) -> ApiResult:
        kv = self._require_buckets().nodes
        node_id = request.node_id

        def change(current: NodeEntry | None) -> NodeEntry:
            if current is None:
                raise _not_found("node", node_id)
            if method == "drain":
                return msgspec.structs.replace(current, draining=True)
            if method == "cordon":
                return msgspec.structs.replace(current, cordoned=True)
            return msgspec.structs.replace(current, cordoned=False, draining=False)

        entry, revision, changed = await mutate(kv, node_id, NodeEntry, change)
        assert entry is not None and revision is not None
        self._require(self.nodes).apply(node_id, entry, revision)
        if changed:
            kind = {"drain": "draining", "cordon": "cordoned", "uncordon": "uncordoned"}[method]
            self._publish(f"node.{kind}", node_id, {"node_id": node_id}, claims.sub)
        return ApiResult(method=method, changed=changed, node=self._node_record(node_id, entry))

    # --- the leader's loop -------------------------------------------------

    async def _loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.config.reconcile_interval)
            lease = self.lease
            if lease is None or not lease.valid() or not self._pass_due():
                continue
            try:
                await self.reconcile_once()
            except NotLeader as exc:
                log.info("pass abandoned: %s", exc)
            except (nats.errors.Error, TimeoutError, ContractError) as exc:
                log.warning("reconcile pass failed: %s", exc)

    async def reconcile_once(self) -> None:
        view = self._view()
        # The pure part runs off the event loop, so requests (discovery,
        # registration) and lease renewals are served while it thinks.
        work = await asyncio.to_thread(_decide, view, self.config.placement_budget)
        await self.carry_out(work)

    def _inputs(self) -> tuple[int, ...]:
        mirrors = (self.nodes, self.deployments, self.observed)
        return (*(m.version if m else -1 for m in mirrors), self._live_version)

    def _pass_due(self) -> bool:
        """Whether a pass could decide anything new: an input changed (registry,
        reports, a node's state by the clock), a command is not done yet, or
        the last pass is ``_QUIET_PASS_EVERY`` old. A steady fleet of a
        thousand nodes otherwise costs a full pass four times a second."""
        if self._last_pass is None or self.nodes is None:
            return True
        at, inputs = self._last_pass
        if self._inputs() != inputs:
            return True
        if asyncio.get_running_loop().time() - at >= _QUIET_PASS_EVERY:
            return True
        if any(t.done_at is None for t in self._retries.tries.values()):
            return True
        return any(
            self._state_of(node_id, entry) is not self.node_states.get(node_id)
            for node_id, (entry, _) in self.nodes.items.items()
        )

    def plan_pass(self) -> Pass:
        """Decide, from the local view only: node states, lost flags, the plan."""
        return _decide(self._view(), self.config.placement_budget)

    def _view(self) -> _View:
        """What a pass decides from, read on the event loop: node states by the
        clock, and references to values nothing mutates in place afterwards."""
        self._last_pass = (asyncio.get_running_loop().time(), self._inputs())
        nodes: list[tuple[NodeEntry, NodeState, dict[str, AgentSummary]]] = []
        for node_id, (entry, _) in sorted(self._require(self.nodes).items.items()):
            state = self._state_of(node_id, entry)
            self.node_states[node_id] = state
            nodes.append((entry, state, self._reported(node_id)))
        return _View(
            nodes=nodes,
            deployments=dict(self._require(self.deployments).items),
            live={k: live.agents for k, live in self.live.items()},
            stored={k: v for k, (v, _) in self._require(self.observed).items.items()},
        )

    async def carry_out(self, work: Pass) -> None:
        """Write the pass's records, then send its commands and events.

        Raises :class:`NotLeader`, before the first write or command it would
        have made, once this controller cannot prove it holds the lease.
        """
        lease = self._require_lease()
        guard = lease.fence
        buckets = self._require_buckets()
        mirror = self._require(self.deployments)
        for node_id, lost in work.marks.items():
            await self._mark_lost(node_id, lost, guard)
        commands: list[Command] = list(work.plan.sweep)
        won = {dp.name for dp in work.plan.deployments if not dp.changed}
        changed = [dp for dp in work.plan.deployments if dp.changed]
        # Written a chunk at a time, concurrently, each chunk right after a fence.
        for start in range(0, len(changed), _WRITE_CHUNK):
            chunk = changed[start : start + _WRITE_CHUNK]
            await guard()
            done = await asyncio.gather(*(self._write_record(buckets, mirror, dp) for dp in chunk))
            won.update(dp.name for dp, ok in zip(chunk, done, strict=True) if ok)
        for dp in work.plan.deployments:
            if dp.name in won:
                commands.extend(dp.commands)
                self._publish_all(dp.events)
        now = asyncio.get_running_loop().time()
        self._retries.forget_except({_Retries.key(c) for c in commands})
        # Stops go out before starts, so a moved replica is not run twice
        # where both nodes can be told.
        ordered = sorted(commands, key=lambda c: isinstance(c, Place))
        due = [c for c in ordered if self._retries.due(c, now)]
        if due:
            await guard()
        for command in due:
            self._spawn(self._send(command))
        if work.observed:
            await self._store_observed(work.observed, guard)

    async def _write_record(
        self, buckets: Buckets, mirror: Mirror[DeploymentRecord], dp: DeploymentPlan
    ) -> bool:
        """One deployment's new record (compare-and-set); False when it changed meanwhile."""
        try:
            if dp.record is None:
                await delete(buckets.agents, dp.name, dp.revision)
                mirror.apply(dp.name, None, dp.revision + 1)
            else:
                revision = await write(buckets.agents, dp.name, dp.record, dp.revision)
                mirror.apply(dp.name, dp.record, revision)
        except ContractError as exc:
            # Changed meanwhile (an API call, another leader): next pass.
            log.info("deployment %s: %s", dp.name, exc)
            return False
        return True

    async def _store_observed(self, reports: dict[str, list[AgentSummary]], guard: Guard) -> None:
        """Write each node's reported agents (a plain put: only the leader writes here)."""
        kv = self._require_buckets().observed
        mirror = self._require(self.observed)
        at = utc_now()

        async def put(node_id: str, agents: list[AgentSummary]) -> None:
            entry = ObservedEntry(node_id=node_id, agents=agents, updated_at=at)
            try:
                revision = await kv.put(node_id, encode(entry))
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("observed state of %s not stored: %s", node_id, exc)
                return  # still different next pass: written then
            mirror.apply(node_id, entry, revision)

        pending = list(reports.items())
        for start in range(0, len(pending), _WRITE_CHUNK):
            await guard()
            await asyncio.gather(*(put(n, a) for n, a in pending[start : start + _WRITE_CHUNK]))

    def _publish_all(self, events: list[Event]) -> None:
        for ev in events:
            self._publish(ev.kind, ev.subject, ev.data, actor=self.config.name)

    async def _mark_lost(self, node_id: str, lost: bool, guard: Guard) -> None:
        kv = self._require_buckets().nodes

        def change(current: NodeEntry | None) -> NodeEntry | None:
            if current is None:
                return None
            return msgspec.structs.replace(current, lost=lost)

        try:
            entry, revision, changed = await mutate(kv, node_id, NodeEntry, change, guard=guard)
        except ContractError as exc:
            log.info("node %s: %s", node_id, exc)  # re-registered meanwhile: next pass
            return
        if entry is not None and revision is not None:
            self._require(self.nodes).apply(node_id, entry, revision)
        if changed and lost:
            self._publish("node.lost", node_id, {"node_id": node_id}, actor=self.config.name)
        elif changed:
            self._publish("node.recovered", node_id, {"node_id": node_id}, actor=self.config.name)

    async def _send(self, command: Command) -> None:
        lease = self.lease
        if lease is None or not lease.valid():
            return  # deposed since the pass was fenced: the new leader decides
        key = _Retries.key(command)
        attempt = self._retries.tries.setdefault(key, _Try())
        attempt.inflight = True
        ok = False
        try:
            if isinstance(command, Place):
                token = self.issuer.mint(
                    self.config.name,
                    ["agents:run"],
                    node=command.node_id,
                    ttl=self.config.command_token_ttl,
                )
                body = encode(PlaceAgent(spec=command.spec, epoch=command.epoch, token=token))
            else:
                token = self.issuer.mint(
                    self.config.name,
                    ["agents:stop"],
                    node=command.node_id,
                    ttl=self.config.command_token_ttl,
                )
                body = encode(
                    RemoveAgent(agent_id=command.agent_id, epoch=command.epoch, token=token)
                )
            msg = await self.nc.request(
                subjects.node_commands(command.node_id), body, timeout=self.config.command_timeout
            )
            reply = decode_reply(msg.data)
            if isinstance(reply, CommandResult):
                ok = True
            elif reply.code in (ErrorCode.STALE_EPOCH, ErrorCode.NOT_FOUND) and not isinstance(
                command, Place
            ):
                ok = True  # the node holds a newer copy, or none: nothing left to stop
            elif reply.code is ErrorCode.STALE_EPOCH:
                ok = True  # a newer placement exists there; reconcile will catch up
            else:
                log.warning("%s refused by %s: %s", key, command.node_id, reply.message)
        except (nats.errors.Error, TimeoutError, ContractError) as exc:
            log.info("%s to %s failed: %s", key[0], command.node_id, exc)
        finally:
            now = asyncio.get_running_loop().time()
            attempt.inflight = False
            if ok:
                attempt.done_at = now
                attempt.tries = 0
            else:
                attempt.tries += 1
                attempt.next_at = now + min(0.2 * 2 ** (attempt.tries - 1), 5.0)

    # --- helpers -------------------------------------------------------------

    def _require_lease(self) -> Lease:
        if self.lease is None:
            raise ContractError(ErrorCode.UNAVAILABLE, "controller is starting")
        return self.lease

    def _require_buckets(self) -> Buckets:
        if self._buckets is None:
            raise ContractError(ErrorCode.UNAVAILABLE, "controller is starting")
        return self._buckets

    @staticmethod
    def _require(mirror: Mirror[Any] | None) -> Mirror[Any]:
        if mirror is None:
            raise ContractError(ErrorCode.UNAVAILABLE, "controller is starting")
        return mirror


def _not_found(what: str, name: str) -> ContractError:
    return ContractError(ErrorCode.NOT_FOUND, f"no {what} {name!r}")


def _create(
    cur: DeploymentRecord | None, req: CreateDeployment, claims: Claims
) -> DeploymentRecord:
    if cur is None:
        return DeploymentRecord(deployment=req.deployment, created_by=claims.sub)
    if cur.deleting:
        raise ContractError(ErrorCode.CONFLICT, f"deployment {cur.name!r} is being deleted")
    if cur.deployment == req.deployment:
        return cur  # the same create again: nothing to do
    raise ContractError(
        ErrorCode.ALREADY_EXISTS, f"deployment {cur.name!r} exists with another shape; use update"
    )


def _live(cur: DeploymentRecord | None, name: str) -> DeploymentRecord:
    if cur is None or cur.deleting:
        raise _not_found("deployment", name)
    return cur


def _update(cur: DeploymentRecord | None, req: UpdateDeployment, _c: Claims) -> DeploymentRecord:
    cur = _live(cur, req.deployment.name)
    if cur.deployment == req.deployment:
        return cur
    if cur.deployment.spec == req.deployment.spec:
        # Only replicas or constraints changed: running copies stay as they are.
        return msgspec.structs.replace(cur, deployment=req.deployment)
    return msgspec.structs.replace(cur, deployment=req.deployment, generation=cur.generation + 1)


def _scale(cur: DeploymentRecord | None, req: ScaleDeployment, _c: Claims) -> DeploymentRecord:
    cur = _live(cur, req.name)
    if cur.deployment.replicas == req.replicas:
        return cur
    try:
        deployment = msgspec.structs.replace(cur.deployment, replicas=req.replicas)
    except ValueError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, str(exc)) from None
    return msgspec.structs.replace(cur, deployment=deployment)


def _delete(cur: DeploymentRecord | None, req: DeleteDeployment, _c: Claims) -> DeploymentRecord:
    if cur is None:
        raise _not_found("deployment", req.name)
    return cur if cur.deleting else msgspec.structs.replace(cur, deleting=True)


_CHANGES: dict[type, Callable[[Any, Any, Claims], DeploymentRecord]] = {
    CreateDeployment: _create,
    UpdateDeployment: _update,
    ScaleDeployment: _scale,
    DeleteDeployment: _delete,
}
