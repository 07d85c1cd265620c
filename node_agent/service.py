"""The node agent's NATS face: a thin adapter around the Supervisor.

It owns the connection (retried with backoff; agents keep running while NATS
is away), the command subscriptions (``nodes.<id>.commands`` as a NATS micro
endpoint of the ``fabric-node`` service, and ``agents.<id>.commands`` for each
hosted agent), registration, heartbeats, and the outgoing stream of statuses
and CloudEvents. Decisions about commands live in
:mod:`node_agent.commands`; supervision lives in :mod:`node_agent.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import nats.errors
import nats.micro
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fabric import __version__
from fabric.audit import Refusal, RefusalAudit
from fabric.cancelled import raise_if_cancelled
from fabric.connect import ConnectError, connect
from fabric.tokens import Claims, TokenVerifier
from node_agent.commands import CommandHandler
from node_agent.config import NodeAgentConfig
from node_agent.fencing import PartitionFence
from node_agent.logstream import LogStreamer
from node_agent.sdnotify import Notifier
from node_agent.supervisor import Supervisor, SupervisorConfig
from schemas import subjects
from schemas.agent import AgentState, AgentStatus
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorReply
from schemas.event import make_event
from schemas.node import (
    AgentSummary,
    NodeHeartbeat,
    NodeInfo,
    NodeResources,
    RegisterReply,
    RegisterRequest,
)

__all__ = ["NodeAgent"]

log = logging.getLogger("fabric.node")

_OUTBOX_LIMIT = 50_000
_MAX_COMMANDS_IN_FLIGHT = 256


class _Outbox:
    """Messages waiting to be published, bounded.

    Statuses are keyed by agent so only the newest one per agent waits while
    NATS is away; events keep their order. When full, the oldest entry goes
    and is counted, so a long outage costs memory up to a cap, never more.
    """

    def __init__(self, limit: int = _OUTBOX_LIMIT) -> None:
        self._items: OrderedDict[object, tuple[str, bytes]] = OrderedDict()
        self._limit = limit
        self._seq = 0
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, subject: str, data: bytes, *, key: object | None = None) -> None:
        if key is None:
            self._seq += 1
            key = self._seq
        else:
            self._items.pop(key, None)
        self._items[key] = (subject, data)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)
            self.dropped += 1
        self._ready.set()

    async def take(self) -> list[tuple[str, bytes]]:
        await self._ready.wait()
        self._ready.clear()
        batch = list(self._items.values())
        self._items.clear()
        return batch

    def __len__(self) -> int:
        return len(self._items)


class NodeAgent:
    """Runs a Supervisor and speaks for it on NATS until asked to shut down."""

    def __init__(self, config: NodeAgentConfig, verifier: TokenVerifier) -> None:
        self.config = config
        self._verifier = verifier
        self._notifier = Notifier()
        self._outbox = _Outbox()
        self._nc: Client | None = None
        self._agent_subs: dict[str, Subscription] = {}
        self._subscribing: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._command_slots = asyncio.Semaphore(_MAX_COMMANDS_IN_FLIGHT)
        self._shutdown_mode: Literal["drain", "detach"] = config.on_sigterm
        self._shutdown = asyncio.Event()
        self._connected = asyncio.Event()
        self._actors: dict[str, str] = {}
        self._heartbeat_seq = 0
        self._publish_errors: set[type[Exception]] = set()  # each kind logged once
        self._heartbeat_interval = config.heartbeat_interval
        self._started_at = utc_now()
        self._registered = False
        self._register_again = asyncio.Event()
        self._fence = PartitionFence()
        self._fenced_agents: set[str] = set()
        self._log_streamers: dict[str, LogStreamer] = {}
        self.ready = asyncio.Event()
        """Set once the node is connected and subscribed (or running standalone)."""
        self._supervisor: Supervisor | None = None
        self._handler: CommandHandler | None = None
        # Refused commands go to events.node.refused, at most 10/s.
        self.audit = RefusalAudit(
            lambda data, actor: self._node_event("node.refused", data, actor=actor)
        )

    # --- lifecycle -------------------------------------------------------

    def request_shutdown(self, mode: Literal["drain", "detach"] | None = None) -> None:
        if mode is not None:
            self._shutdown_mode = mode
        self._shutdown.set()

    async def run(self) -> None:
        cfg = self.config
        sup_config = SupervisorConfig(
            node_id=cfg.node_id,
            state_dir=cfg.state_dir,
            metrics_interval=cfg.metrics_interval,
            extra_env=lambda spec: cfg.agent_env(spec.name),
        )
        async with Supervisor(
            sup_config, on_status=self._on_status, on_event=self._on_event
        ) as sup:
            self._supervisor = sup
            self._handler = CommandHandler(
                cfg.node_id,
                sup,
                self._verifier,
                on_drain=self._drain,
                on_shutdown=self._on_shutdown_command,
                on_accepted=self._on_accepted,
                on_follow_logs=self.follow_logs,
                on_refused=self._on_refused,
                max_bytes=cfg.max_command_bytes,
                policy=cfg.spec_policy,
            )
            for status in sup.statuses():
                self._on_status(status)
            tasks = [
                asyncio.create_task(self._nats_loop(), name="nats"),
                asyncio.create_task(self._publish_loop(), name="publish"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._contact_loop(), name="contact"),
                asyncio.create_task(self._watchdog_loop(), name="watchdog"),
            ]
            try:
                await self._shutdown.wait()
            finally:
                self._notifier.stopping(f"shutting down ({self._shutdown_mode})")
                log.info("node %s shutting down (%s)", cfg.node_id, self._shutdown_mode)
                await sup.shutdown(self._shutdown_mode)
                # Cancel until they end: on Python 3.11 asyncio.wait_for (inside
                # nats-py's flush, which the contact loop calls twice a second)
                # swallows a cancel that lands as its future completes, and the
                # loop then went on for ever, the node with it (SIGTERM with
                # 1,000 agents: stuck until SIGKILLed).
                while pending := [t for t in tasks if not t.done()]:
                    for task in pending:
                        task.cancel()
                    await asyncio.wait(pending, timeout=1.0)
                await asyncio.gather(*tasks, return_exceptions=True)  # all done: collects errors
                # Saying goodbye on NATS must never keep the node from exiting.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await self._flush_outbox()
                        await self._close()

    async def _close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._notifier.close()

    async def _flush_outbox(self) -> None:
        # Final statuses (stopped, detached) should reach the dashboards.
        nc = self._nc
        if nc is None or not nc.is_connected or not len(self._outbox):
            return
        with contextlib.suppress(Exception):
            for subject, data in await self._outbox.take():
                await nc.publish(subject, data)
            await asyncio.wait_for(nc.flush(), timeout=2)

    # --- supervisor callbacks (sync, on the loop) ------------------------

    def follow_logs(self, agent_id: str, seconds: float) -> None:
        """Publish the agent's new output lines for ``seconds`` (extends a running follow)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        streamer = self._log_streamers.get(agent_id)
        if streamer is not None:
            streamer.until = max(streamer.until, until)
            return
        sup = self._require_supervisor()
        subject = subjects.agent_logs(agent_id)
        streamer = LogStreamer(
            agent_id,
            self.config.node_id,
            follow=lambda stream: sup.follow_logs(agent_id, stream),
            emit=lambda batch: self._outbox.put(subject, encode(batch)),
        )
        streamer.until = until
        self._log_streamers[agent_id] = streamer

        async def run() -> None:
            try:
                await streamer.run()
            except ContractError:
                pass  # the agent was removed while followed
            finally:
                self._log_streamers.pop(agent_id, None)

        self._spawn(run())

    def _on_status(self, status: AgentStatus) -> None:
        self._outbox.put(
            subjects.agent_status(status.agent_id), encode(status), key=status.agent_id
        )
        if self._nc is not None and status.agent_id not in self._agent_subs:
            self._spawn(self._subscribe_agent(status.agent_id))
        sup = self._supervisor
        if (
            sup is not None
            and status.agent_id not in self._log_streamers
            and status.state in (AgentState.STARTING, AgentState.RUNNING)
            and sup.spec(status.agent_id).logs.publish
        ):
            self.follow_logs(status.agent_id, float("inf"))

    def _nc_up(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _on_event(self, kind: str, agent_id: str, data: dict[str, Any]) -> None:
        event = make_event(
            kind,
            source=f"/nodes/{self.config.node_id}",
            subject=agent_id,
            data=data,
            actor=self._actors.get(agent_id),
        )
        self._outbox.put(subjects.event(kind), encode(event))

    def _on_accepted(self, op: str, agent_id: str | None, claims: Claims) -> None:
        if agent_id is not None:
            self._actors[agent_id] = claims.sub

    def _on_refused(self, refusal: Refusal) -> None:
        self.audit(refusal)

    def _node_event(self, kind: str, data: dict[str, Any], actor: str | None = None) -> None:
        event = make_event(
            kind,
            source=f"/nodes/{self.config.node_id}",
            subject=self.config.node_id,
            data=data,
            actor=actor,
        )
        self._outbox.put(subjects.event(kind), encode(event))

    # --- node-level actions ---------------------------------------------

    async def _drain(self) -> None:
        sup = self._require_supervisor()
        await sup.stop_many([s.agent_id for s in sup.statuses()])
        self._node_event("node.drained", {"agents": len(sup.statuses())})

    async def _on_shutdown_command(self, mode: Literal["drain", "detach"]) -> None:
        # Reply first, then go: the shutdown starts after this handler returns.
        asyncio.get_running_loop().call_later(0.05, self.request_shutdown, mode)

    def _require_supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "supervisor not started"
        return self._supervisor

    # --- NATS ------------------------------------------------------------

    async def _nats_loop(self) -> None:
        delay = 0.5
        while True:
            raise_if_cancelled()
            try:
                nc = await connect(
                    self.config.nats_urls,
                    ca=self.config.ca,
                    cert=self.config.cert,
                    key=self.config.key,
                    name=f"fabric-node-{self.config.node_id}",
                    reconnected_cb=self._on_reconnected,
                    disconnected_cb=self._on_disconnected,
                )
            except ConnectError as exc:
                if not self.ready.is_set():
                    self._notifier.ready(f"standalone: {exc}")
                    self.ready.set()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
                continue
            break
        self._nc = nc
        await self._serve(nc)
        self._connected.set()
        self._notifier.ready(f"connected to {nc.connected_url.netloc if nc.connected_url else '?'}")
        self.ready.set()
        self._node_event("node.started", {"pid": os.getpid(), "version": __version__})
        await self._registration_loop()  # nats-py reconnects by itself from here on

    async def _registration_loop(self) -> None:
        """Register now, again on every reconnect or fence lift, and keep trying
        with backoff while no controller answers (controllers may start later)."""
        delay = 1.0
        while True:
            raise_if_cancelled()
            self._register_again.clear()
            if await self._register():
                delay = 1.0
                await self._register_again.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._register_again.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _serve(self, nc: Client) -> None:
        service = await nats.micro.add_service(
            nc,
            name="fabric-node",
            version=__version__,
            description="agent-fabric node agent",
            metadata={"node_id": self.config.node_id},
            stats_handler=self._stats,
        )
        await service.add_endpoint(
            name="commands",
            subject=subjects.node_commands(self.config.node_id),
            handler=self._on_node_request,
            queue_group=f"node-{self.config.node_id}",
        )
        for status in self._require_supervisor().statuses():
            await self._subscribe_agent(status.agent_id)
        await nc.flush()

    def _stats(self, _endpoint: Any) -> dict[str, Any]:
        handler = self._handler
        return {
            "refused": {code.value: n for code, n in handler.refused.items()} if handler else {},
            "accepted": dict(handler.accepted) if handler else {},
            "agents": len(self._require_supervisor().statuses()),
            "outbox_dropped": self._outbox.dropped,
            "audit_suppressed": self.audit.suppressed,
        }

    async def _subscribe_agent(self, agent_id: str) -> None:
        nc = self._nc
        if nc is None or agent_id in self._agent_subs or agent_id in self._subscribing:
            return
        self._subscribing.add(agent_id)
        try:
            subject = subjects.agent_commands(agent_id)
            self._agent_subs[agent_id] = await nc.subscribe(subject, cb=self._on_agent_request)
        finally:
            self._subscribing.discard(agent_id)

    async def _reconcile_subscriptions(self) -> None:
        hosted = set(self._require_supervisor().agent_ids())
        for agent_id, streamer in self._log_streamers.items():
            if agent_id not in hosted:
                streamer.until = 0.0
        for agent_id in list(self._agent_subs):
            if agent_id not in hosted:
                sub = self._agent_subs.pop(agent_id)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        for agent_id in hosted - self._agent_subs.keys():
            with contextlib.suppress(Exception):
                await self._subscribe_agent(agent_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _on_agent_request(self, msg: Msg) -> None:
        agent_id = msg.subject.split(".")[1]
        handler = self._handler
        assert handler is not None
        self._spawn(self._reply(msg, lambda: handler.agent_command(agent_id, msg.data)))

    async def _on_node_request(self, request: nats.micro.Request) -> None:
        handler = self._handler
        assert handler is not None
        # The micro request wraps the message; reply on it directly.
        msg = request._msg
        self._spawn(self._reply(msg, lambda: handler.node_command(msg.data)))

    async def _reply(self, msg: Msg, work: Callable[[], Awaitable[bytes]]) -> None:
        async with self._command_slots:
            reply = await work()
        # Subscribe a newly placed agent's command subject before replying: the
        # server handles one connection's messages in order, so whoever gets
        # the reply can command the agent at once.
        await self._reconcile_subscriptions()
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(reply)

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        self._register_again.set()

    async def _on_disconnected(self) -> None:
        log.warning("disconnected from NATS; agents keep running")

    async def _register(self) -> bool:
        """One registration attempt; True when a controller answered and we applied it."""
        nc = self._nc
        sup = self._require_supervisor()
        if nc is None:
            return False
        mem = psutil.virtual_memory()
        info = NodeInfo(
            node_id=self.config.node_id,
            hostname=socket.gethostname()[:253],
            pid=os.getpid(),
            version=__version__,
            labels=self.config.labels,
            capabilities=sorted(
                set(self.config.capabilities)
                | {c for s in sup.statuses() for c in sup.spec(s.agent_id).capabilities}
            ),
            resources=NodeResources(cpus=float(psutil.cpu_count() or 1), memory_bytes=mem.total),
            started_at=self._started_at,
        )
        request = RegisterRequest(node=info, agents=self._summaries())
        try:
            msg = await nc.request(
                subjects.node_register(self.config.node_id),
                encode(request),
                timeout=self.config.register_timeout,
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if self._registered:
                log.warning("no controller answered registration; carrying on standalone")
            else:
                log.info("no controller answered; running standalone")
            return False
        try:
            reply = decode(msg.data, RegisterReply | ErrorReply)  # type: ignore[arg-type]
        except ContractError as exc:
            log.error("bad registration reply: %s", exc)
            return False
        if isinstance(reply, ErrorReply):
            log.error("registration refused: %s", reply.message)
            return False
        self._registered = True
        log.info("registered with a controller: %d placements here", len(reply.agents))
        # The controller's liveness clock is tuned to its own interval.
        self._heartbeat_interval = reply.heartbeat_interval or self._heartbeat_interval
        self._fence.arm(reply.node_timeout, asyncio.get_running_loop().time())
        fenced, self._fenced_agents = self._fenced_agents, set()
        await self._drop_unplaced(reply)
        for placement in reply.agents:
            name = placement.spec.name
            try:
                status = await sup.place(placement.spec, placement.epoch)
                if name in fenced and status.epoch == placement.epoch:
                    # Still ours after the partition: bring the fenced copy back.
                    await sup.start(name)
            except ContractError as exc:
                log.error("cannot place %s: %s", name, exc)
        return True

    async def _drop_unplaced(self, reply: RegisterReply) -> None:
        """Remove controller-placed copies (epoch > 0) the controller no longer places here.

        After a partition this is how a node learns its copy is stale; copies
        started by hand (epoch 0) are not the controller's to take away.
        """
        sup = self._require_supervisor()
        placed = {p.spec.name for p in reply.agents}
        stale = [s.agent_id for s in sup.statuses() if s.epoch > 0 and s.agent_id not in placed]
        for agent_id in stale:
            log.warning("%s is no longer placed on this node: removing the stale copy", agent_id)
            with contextlib.suppress(ContractError):
                await sup.remove(agent_id)
            self._on_event("agent.stale_removed", agent_id, {"reason": "not placed here"})

    def _summaries(self) -> list[AgentSummary]:
        return self._require_supervisor().summaries()

    async def _publish_loop(self) -> None:
        await self._connected.wait()
        while True:
            batch = await self._outbox.take()
            nc = self._nc
            assert nc is not None
            for subject, data in batch:
                try:
                    await nc.publish(subject, data)
                except Exception as exc:
                    # Whatever one message does (too large, connection closed),
                    # this loop carries the heartbeats too: it must not end.
                    self._outbox.dropped += 1
                    if type(exc) not in self._publish_errors:
                        self._publish_errors.add(type(exc))
                        log.error("cannot publish on %s (%d bytes): %r", subject, len(data), exc)

    async def _heartbeat_loop(self) -> None:
        await self._connected.wait()
        sup = self._require_supervisor()
        subject = subjects.node_heartbeat(self.config.node_id)
        while True:
            self._heartbeat_seq += 1
            beat = NodeHeartbeat(
                node_id=self.config.node_id,
                seq=self._heartbeat_seq,
                sent_at=utc_now(),
                pid=os.getpid(),
                draining=bool(self._handler and self._handler.draining),
                agents=self._summaries(),
                metrics=sup.node_metrics(),
            )
            self._outbox.put(subject, encode(beat), key="__heartbeat__")
            await asyncio.sleep(self._heartbeat_interval)

    async def _contact_loop(self) -> None:
        """Probe the server twice per heartbeat; fence or un-fence on what it shows."""
        await self._connected.wait()
        loop = asyncio.get_running_loop()
        while True:
            raise_if_cancelled()
            period = self._heartbeat_interval / 2
            if self._fence.must_fence(loop.time()):
                await self._self_fence()
            sent = loop.time()
            if await self._round_trip(period):
                # A pause that began inside the round trip still counts as lost contact.
                if self._fence.must_fence(loop.time()):
                    await self._self_fence()
                if self._fence.contact(sent):
                    log.warning("contact with NATS is back; asking the controller what is ours")
                    self._register_again.set()
            await asyncio.sleep(max(0.0, sent + period - loop.time()))

    async def _round_trip(self, timeout: float) -> bool:  # noqa: ASYNC109 - the probe's own bound
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.flush(timeout=max(timeout, 0.05))
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    async def _self_fence(self) -> None:
        sup = self._require_supervisor()
        doomed = [
            s.agent_id
            for s in sup.statuses()
            if sup.spec(s.agent_id).on_partition == "stop"
            and s.state in (AgentState.STARTING, AgentState.RUNNING, AgentState.PAUSED)
        ]
        if not doomed:
            return
        log.warning("out of contact with NATS: stopping %d on_partition=stop agents", len(doomed))
        self._fenced_agents.update(doomed)
        # Short grace: the copy must be down before the controller re-places it.
        await sup.stop_many(doomed, timeout=0.2)
        for agent_id in doomed:
            self._on_event("agent.fenced", agent_id, {"reason": "out of contact with NATS"})

    async def _watchdog_loop(self) -> None:
        interval = self._notifier.watchdog_interval
        if interval is None:
            return
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)
