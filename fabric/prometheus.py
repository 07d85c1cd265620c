"""The controller's Prometheus metrics, served on ``--metrics-port``.

Each :class:`ControllerMetrics` has its own ``CollectorRegistry`` (never the
process-wide default one) holding one custom collector, which reads the
controller's live view at scrape time: nothing is copied on every status or
heartbeat, and a scrape always shows what the controller knows right now.
Node metrics (CPU, memory, load) come from the heartbeats, which this module
follows on the controller's own connection, since the controller keeps only
their timing.

Families (names as exposed)::

    fabric_controller_leader                   1 while this controller holds the lease
    fabric_agents{state}                        agents by state (every state, 0 included)
    fabric_agent_restarts_total{agent,node}     restarts the hosting node counted
    fabric_agent_cpu_percent{agent,node}        whole process tree, latest sample
    fabric_agent_memory_rss_bytes{agent,node}
    fabric_agent_healthy{agent,node,health}     1 for the agent's current verdict
    fabric_nodes{state}                         nodes by state
    fabric_node_cpus{node}                      resources the node declared
    fabric_node_memory_bytes{node}
    fabric_node_cpu_percent{node}               latest heartbeat sample
    fabric_node_memory_used_bytes{node}
    fabric_node_load1{node}
    fabric_node_heartbeat_age_seconds{node}
    fabric_nodes_lost_total                     node.lost events this controller raised
    fabric_agents_replaced_total                replicas it re-placed after a failure
    fabric_events_published_total{kind}
    fabric_refused_messages_total{code}         malformed or refused input, by error code
    fabric_api_calls_total{method}
    fabric_task_backlog{type}                   tasks in TASKS not yet acked (read per scrape)
    fabric_tasks_in_flight{type}                tasks this controller is running on agents now
    fabric_tasks_finished_total{type,outcome}   succeeded / failed / dead, as it dispatched them
    fabric_task_duration_seconds{type}          histogram of attempt run times

Served by aiohttp (asyncio, no thread) at ``/metrics``; ``/`` says where.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fabric.cli import CommandFailed
from fabric.controller.liveness import NodeFlags, node_state
from fabric.controller.service import Controller
from fabric.tasks.backlog import queue_backlog
from schemas import subjects
from schemas.agent import AgentState, AgentStatus, HealthVerdict
from schemas.codec import decode
from schemas.common import utc_now
from schemas.errors import ContractError
from schemas.event import CloudEvent
from schemas.node import NodeHeartbeat, NodeMetrics, NodeState

__all__ = ["ControllerMetrics", "current_agents", "run_with_metrics"]

log = logging.getLogger(__name__)

_MAX_HEARTBEAT = 16 * 1024 * 1024


def current_agents(controller: Controller) -> list[AgentStatus]:
    """One status per placed replica, from where it is placed (as discovery answers)."""
    out: list[AgentStatus] = []
    mirror = controller.deployments
    if mirror is None:
        return out
    for record, _ in mirror.items.values():
        for p in record.replicas:
            if p.node_id is None:
                continue
            status = controller.statuses.get(p.agent_id, {}).get(p.node_id)
            if status is None:
                live = controller.live.get(p.node_id)
                summary = live.agents.get(p.agent_id) if live else None
                if summary is None:
                    continue
                status = AgentStatus(
                    agent_id=summary.agent_id,
                    node_id=p.node_id,
                    state=summary.state,
                    since=utc_now(),
                    pid=summary.pid,
                    epoch=summary.epoch,
                )
            out.append(status)
    return out


class _Collector(Collector):
    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        ctl = self.metrics.controller
        yield from self._controller(ctl)
        yield from self._agents(current_agents(ctl))
        yield from self._nodes(ctl)
        yield from self._counters(ctl)
        yield from self._tasks(ctl)

    def _tasks(self, ctl: Controller) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "fabric_task_backlog", "Tasks stored in the queue, not yet acked", labels=["type"]
        )
        for task_type, n in sorted(self.metrics.backlog.items()):
            backlog.add_metric([task_type], n)
        in_flight = GaugeMetricFamily(
            "fabric_tasks_in_flight", "Tasks this controller runs on agents now", labels=["type"]
        )
        dispatcher = getattr(ctl, "dispatcher", None)
        by_type = getattr(dispatcher, "by_type", None) or {}
        for task_type, n in sorted(by_type.items()):
            in_flight.add_metric([task_type], n)
        yield from (backlog, in_flight)

    @staticmethod
    def _controller(ctl: Controller) -> Iterator[Metric]:
        leader = GaugeMetricFamily(
            "fabric_controller_leader",
            "1 while this controller holds the leader lease",
            labels=["controller"],
        )
        holds = ctl.lease is not None and ctl.lease.valid()
        leader.add_metric([ctl.config.name], 1.0 if holds else 0.0)
        yield leader

    @staticmethod
    def _agents(agents: list[AgentStatus]) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("fabric_agents", "Agents by state", labels=["state"])
        counts = dict.fromkeys(AgentState, 0)
        for a in agents:
            counts[a.state] += 1
        for state, n in counts.items():
            by_state.add_metric([state.value], n)
        yield by_state
        labels = ["agent", "node"]
        restarts = CounterMetricFamily(
            "fabric_agent_restarts", "Restarts of the agent counted by its node", labels=labels
        )
        cpu = GaugeMetricFamily(
            "fabric_agent_cpu_percent", "CPU of the agent's process tree", labels=labels
        )
        rss = GaugeMetricFamily(
            "fabric_agent_memory_rss_bytes", "RSS of the agent's process tree", labels=labels
        )
        health = GaugeMetricFamily(
            "fabric_agent_healthy",
            "1 for the agent's current health verdict",
            labels=[*labels, "health"],
        )
        for a in sorted(agents, key=lambda s: s.agent_id):
            key = [a.agent_id, a.node_id]
            restarts.add_metric(key, a.restarts)
            for verdict in HealthVerdict:
                health.add_metric([*key, verdict.value], 1.0 if a.health is verdict else 0.0)
            if a.metrics is not None and a.state in (AgentState.RUNNING, AgentState.PAUSED):
                cpu.add_metric(key, a.metrics.cpu_percent)
                rss.add_metric(key, a.metrics.rss_bytes)
        yield from (restarts, cpu, rss, health)

    def _nodes(self, ctl: Controller) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("fabric_nodes", "Nodes by state", labels=["state"])
        node = ["node"]
        cpus = GaugeMetricFamily("fabric_node_cpus", "CPUs the node declared", labels=node)
        mem = GaugeMetricFamily("fabric_node_memory_bytes", "Memory the node declared", labels=node)
        cpu_pct = GaugeMetricFamily("fabric_node_cpu_percent", "Host CPU use", labels=node)
        mem_used = GaugeMetricFamily(
            "fabric_node_memory_used_bytes", "Host memory in use", labels=node
        )
        load1 = GaugeMetricFamily("fabric_node_load1", "Host load average (1 min)", labels=node)
        age = GaugeMetricFamily(
            "fabric_node_heartbeat_age_seconds", "Seconds since the last heartbeat", labels=node
        )
        counts = dict.fromkeys(NodeState, 0)
        now = time.monotonic()  # the loop's clock: controller.live holds loop.time() values
        entries = dict(ctl.nodes.items) if ctl.nodes is not None else {}
        for node_id, (entry, _) in sorted(entries.items()):
            live = ctl.live.get(node_id)
            last_seen = live.last_seen if live else None
            flags = NodeFlags(
                cordoned=entry.cordoned, draining=entry.draining or bool(live and live.draining)
            )
            counts[node_state(last_seen, now, flags, ctl.liveness)] += 1
            cpus.add_metric([node_id], entry.info.resources.cpus)
            mem.add_metric([node_id], entry.info.resources.memory_bytes)
            if last_seen is not None:
                age.add_metric([node_id], max(0.0, now - last_seen))
            sample = self.metrics.node_metrics.get(node_id)
            if sample is not None:
                cpu_pct.add_metric([node_id], sample.cpu_percent)
                mem_used.add_metric([node_id], sample.memory_used_bytes)
                load1.add_metric([node_id], sample.load1)
        for state, n in counts.items():
            by_state.add_metric([state.value], n)
        yield from (by_state, cpus, mem, cpu_pct, mem_used, load1, age)

    @staticmethod
    def _counters(ctl: Controller) -> Iterator[Metric]:
        published = ctl.published
        lost = CounterMetricFamily("fabric_nodes_lost", "Nodes this controller declared lost")
        lost.add_metric([], published.get("node.lost", 0))
        replaced = CounterMetricFamily(
            "fabric_agents_replaced", "Replicas re-placed on another node after a failure"
        )
        replaced.add_metric([], published.get("agent.replaced", 0))
        events = CounterMetricFamily(
            "fabric_events_published", "Events this controller published", labels=["kind"]
        )
        for kind, n in sorted(published.items()):
            events.add_metric([kind], n)
        refused = CounterMetricFamily(
            "fabric_refused_messages", "Messages refused, by error code", labels=["code"]
        )
        for code, n in sorted(ctl.refused.items()):
            refused.add_metric([code], n)
        calls = CounterMetricFamily(
            "fabric_api_calls", "Operator API calls answered, by method", labels=["method"]
        )
        for method, n in sorted(ctl.api_calls.items()):
            calls.add_metric([method], n)
        yield from (lost, replaced, events, refused, calls)


class ControllerMetrics:
    """A registry of one controller's metrics and the HTTP face that serves it."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.node_metrics: dict[str, NodeMetrics] = {}
        self.backlog: dict[str, int] = {}
        self.tasks_finished = PromCounter(
            "fabric_tasks_finished",
            "Tasks this controller dispatched to an end, by outcome",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.task_duration = Histogram(
            "fabric_task_duration_seconds",
            "Run time of task attempts on their agents",
            ["type"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
        )
        self._subs: list[Subscription] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    def render(self) -> bytes:
        """The exposition text of a scrape made now."""
        return generate_latest(self.registry)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, NodeHeartbeat, max_bytes=_MAX_HEARTBEAT)
        except ContractError:
            return  # the controller's own handler counts it as refused
        if beat.metrics is not None:
            self.node_metrics[beat.node_id] = beat.metrics

    async def _on_task_event(self, msg: Msg) -> None:
        try:
            event = decode(msg.data, CloudEvent)
        except ContractError:
            return
        data = event.data if isinstance(event.data, dict) else {}
        task_type = data.get("type")
        # Every controller sees every event: count only what this one dispatched.
        if event.source != self.controller.source or not isinstance(task_type, str):
            return
        outcome = event.kind.removeprefix("task.")
        if outcome in ("succeeded", "failed", "dead"):
            self.tasks_finished.labels(task_type, outcome).inc()
        duration = data.get("duration")
        if outcome in ("succeeded", "failed") and isinstance(duration, int | float):
            self.task_duration.labels(task_type).observe(duration)

    async def refresh_backlog(self) -> None:
        """Messages per ``tasks.<type>.queue`` in stream TASKS (work queue: not yet acked)."""
        counts = await queue_backlog(self.controller.nc.jetstream())
        if counts is not None:  # None: no task stream yet, or JetStream busy: last figures stand
            self.backlog = counts

    async def _handle(self, _request: web.Request) -> web.Response:
        await self.refresh_backlog()
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    async def _root(_request: web.Request) -> web.Response:
        return web.Response(text="agent-fabric controller metrics: /metrics\n")

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port) and follow heartbeats; the bound port."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get("/", self._root)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise CommandFailed(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        nc = self.controller.nc
        self._subs = [
            await nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat),
            await nc.subscribe("events.task.>", cb=self._on_task_event),
        ]
        self.port = int(runner.addresses[0][1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def run_with_metrics(controller: Controller, host: str, port: int) -> None:
    """Run the controller with its metrics endpoint; the endpoint stops with it."""
    metrics = ControllerMetrics(controller)
    await metrics.start(host, port)
    try:
        await controller.run()
    finally:
        await metrics.stop()
