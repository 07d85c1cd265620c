"""The act layer: runs agents, restarts them, stops them, reports every change.

One asyncio task per agent runs its loop::

    spawn ─▶ starting ─(start_seconds, or at once when 0)─▶ running ─▶ exit
      ▲                                                                 │
      └──── backoff sleep (a stop cuts it short) ◀── Restart ◀─ RestartTracker
                                         GiveUp ─▶ failed (+ agent.failed)
                                         StayDown ─▶ exited | stopped

Exits arrive through the reaper's futures (SIGCHLD, or a pidfd for
re-adopted processes): no polling. Commands (stop, pause, ...) act on the
process directly and let the loop observe the exit; a per-agent lock keeps
two commands on one agent from interleaving. Spawning is synchronous (Popen
returns once the child exec'd), so a ``start_seconds=0`` agent is running
before ``place()`` returns, and a crash with zero backoff is followed by a
new process in the same loop wake-up.

``on_status(AgentStatus)`` is called on every transition and for every live
agent after each metrics tick; ``on_event(kind, agent_id, data)`` for:
``agent.placed``, ``agent.started``, ``agent.exited``, ``agent.restarting``,
``agent.failed`` (escalation when ``data["escalate"]``), ``agent.stopped``,
``agent.unhealthy``, ``agent.healthy``, ``agent.limit_exceeded``,
``agent.readopted``, ``agent.paused``, ``agent.resumed``, ``agent.signalled``,
``agent.removed``, ``agent.state_unsaved`` / ``agent.state_saved`` (a state
write failed, e.g. disk full / works again), ``agent.logs_dropped`` (a log
past max_bytes truncated without its backup). Both run synchronously on the
loop and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import psutil

from node_agent.cgroup import AgentCgroup, CgroupTree, host_favors_dynmods
from node_agent.health import HealthMonitor, make_probe
from node_agent.lifecycle import AgentLifecycle
from node_agent.limits import Plan, apply_limits, memory_exceeded, rlimits_for
from node_agent.logfiles import LogFiles, LogsDropped, Stream
from node_agent.metrics import AGENT_ID_ENV, ProcTable, TreeTracker, node_metrics
from node_agent.reaper import ChildReaper, ExitInfo, same_process
from node_agent.restart import ExitReport, GiveUp, Restart, RestartTracker
from node_agent.spawn import (
    build_env,
    mark_reaped,
    release,
    signal_group,
    signal_known,
    spawn,
)
from node_agent.state_store import AgentRecord, StateStore
from schemas.agent import (
    AgentMetrics,
    AgentSpec,
    AgentState,
    AgentStatus,
    HealthVerdict,
    SignalName,
)
from schemas.errors import ContractError, ErrorCode
from schemas.node import AgentSummary, NodeMetrics

__all__ = ["EventCallback", "StatusCallback", "Supervisor", "SupervisorConfig"]

log = logging.getLogger(__name__)

S = AgentState
StatusCallback = Callable[[AgentStatus], None]
EventCallback = Callable[[str, str, dict[str, Any]], None]
SIGNALS: frozenset[str] = frozenset(get_args(SignalName))
LIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})
FINAL = frozenset({S.STOPPED, S.EXITED, S.FAILED})
# How long a /proc scan is reused by stops that start together (100 parallel stops).
_TABLE_MAX_AGE = 0.25
# After SIGKILL the kernel needs a moment; past this something is badly wrong.
_KILL_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """``cgroup_base``: "auto" detects a writable cgroup v2 subtree, a Path forces
    one, None disables cgroups (rlimits and watchdog only)."""

    node_id: str
    state_dir: Path
    metrics_interval: float = 5.0
    cgroup_base: Path | Literal["auto"] | None = "auto"
    extra_env: Callable[[AgentSpec], Mapping[str, str]] | None = None


class _Agent:
    """Everything the supervisor tracks for one agent (private, mutable)."""

    def __init__(self, spec: AgentSpec, epoch: int, rng: random.Random) -> None:
        self.spec = spec
        self.epoch = epoch
        self.lc = AgentLifecycle()
        self.tracker = RestartTracker(spec.restart, rng)
        self.restarts = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.create_time: float | None = None
        self.exit: asyncio.Future[ExitInfo] | None = None
        self.started_at = 0.0  # loop time of the current run's spawn
        self.cgroup: AgentCgroup | None = None
        self.plan: Plan = {}
        self.frozen = False  # paused by freezer or SIGSTOP
        self.manual_stop = False
        self.keep_desired = False  # a drain stop: the next node agent restarts it
        self.cause: str | None = None  # why the supervisor itself is ending the run
        self.health = HealthVerdict.UNKNOWN
        self.metrics: AgentMetrics | None = None
        self.seen: dict[int, float] = {}  # descendants ever seen: pid -> create time
        self.task: asyncio.Task[None] | None = None
        self.killer: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # cuts a backoff sleep short
        self.lock = asyncio.Lock()
        self.message = ""
        self.forgotten = False  # being removed: its record must not be written again

    @property
    def id(self) -> str:
        return self.spec.name


class Supervisor:
    """Supervises this node's agents. Use as ``async with Supervisor(...) as sup``."""

    def __init__(
        self,
        config: SupervisorConfig,
        *,
        on_status: StatusCallback | None = None,
        on_event: EventCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._on_status = on_status
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        self._agents: dict[str, _Agent] = {}
        self._reaper = ChildReaper()
        self._store = StateStore(config.state_dir)
        self._logs = LogFiles(config.state_dir / "logs")
        self._trees = TreeTracker()
        self._cgroups: CgroupTree | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics_task: asyncio.Task[None] | None = None
        self._unsaved: set[str] = set()  # agents whose last state write failed
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- context ---------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        self._loop = asyncio.get_running_loop()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._reaper.start()
        try:
            self._cgroups = self._detect_cgroups()
            if self._cgroups is not None and not host_favors_dynmods():
                log.warning(
                    "cgroup2 is mounted without favordynmods: moving each new agent into"
                    " its cgroup may wait 10-15 ms for an RCU grace period (see"
                    " 'Fast spawns' in deploy/install.md)"
                )
            self._readopt()
        except BaseException:
            await self._cancel_tasks()
            self._reaper.close()
            raise
        self._metrics_task = self._loop.create_task(self._metrics_loop(), name="metrics")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._closed:
                await self.shutdown("drain")
        finally:
            await self._cancel_tasks()
            self._reaper.close()

    def _detect_cgroups(self) -> CgroupTree | None:
        base = self.config.cgroup_base
        if base is None:
            return None
        if base != "auto":
            return CgroupTree.detect(Path(base))
        # Unique per node id and state dir, stable across node agent restarts.
        digest = hashlib.sha1(str(self.config.state_dir.resolve()).encode()).hexdigest()[:8]
        return CgroupTree.detect(name=f"fabric-{self.config.node_id}-{digest}")

    @property
    def cgroups(self) -> CgroupTree | None:
        return self._cgroups

    @property
    def subreaper(self) -> bool:
        return self._reaper.subreaper

    @property
    def orphans_reaped(self) -> int:
        return self._reaper.orphans_reaped

    # -- public API ------------------------------------------------------------

    async def place(self, spec: AgentSpec, epoch: int = 0) -> AgentStatus:
        """Run ``spec``; the same spec and epoch again is a no-op, a new one replaces it."""
        self._require_open()
        if spec.name not in self._agents:
            a = _Agent(spec, epoch, self._rng)
            self._agents[spec.name] = a
            self._event("agent.placed", a, epoch=epoch)
            async with a.lock:
                self._launch(a, "placed")
            return await self._durable_status(a)
        async with self._hold(spec.name) as a:
            if epoch < a.epoch:
                raise ContractError(
                    ErrorCode.STALE_EPOCH, f"agent {a.id} is at epoch {a.epoch}, not {epoch}"
                )
            if a.spec == spec and a.epoch == epoch:
                return self._status(a)
            if a.lc.state not in FINAL:
                await self._stop(a, None, reason="replaced by a new placement")
            a.spec, a.epoch = spec, epoch
            a.tracker = RestartTracker(spec.restart, self._rng)
            self._event("agent.placed", a, epoch=epoch)
            self._launch(a, "re-placed")
            return await self._durable_status(a)

    async def start(self, agent_id: str) -> AgentStatus:
        self._require_open()
        async with self._hold(agent_id) as a:
            if a.lc.state not in FINAL:
                raise ContractError(
                    ErrorCode.INVALID_STATE, f"agent {agent_id} is {a.lc.state.value}"
                )
            a.tracker.reset()
            self._launch(a, "start requested")
            return await self._durable_status(a)

    async def stop(self, agent_id: str, timeout: float | None = None) -> AgentStatus:  # noqa: ASYNC109 - a grace period (stop_timeout override), not a deadline
        """Manual stop: stop signal, ``timeout`` (else spec.stop_timeout), then SIGKILL."""
        async with self._hold(agent_id) as a:
            await self._stop(a, timeout)
            return self._status(a)

    async def stop_many(
        self,
        agent_ids: Iterable[str],
        timeout: float | None = None,  # noqa: ASYNC109 - grace period, as in stop()
    ) -> list[AgentStatus]:
        ids = list(agent_ids)
        for agent_id in ids:
            self._get(agent_id)  # NOT_FOUND before anything is stopped
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.stop(agent_id, timeout)) for agent_id in ids]
        return [t.result() for t in tasks]

    async def restart(self, agent_id: str) -> AgentStatus:
        self._require_open()
        async with self._hold(agent_id) as a:
            if a.lc.state not in FINAL:
                await self._stop(a, None, reason="restart requested")
            a.tracker.reset()
            self._launch(a, "restart requested")
            return await self._durable_status(a)

    async def signal(self, agent_id: str, signame: SignalName) -> AgentStatus:
        if signame not in SIGNALS:
            raise ContractError(ErrorCode.INVALID_PAYLOAD, f"signal {signame!r} is not allowed")
        async with self._hold(agent_id) as a:
            if a.lc.state not in LIVE or a.pid is None:
                raise ContractError(
                    ErrorCode.INVALID_STATE, f"agent {agent_id} is {a.lc.state.value}"
                )
            signal_group(a.pid, signal.Signals[signame])
            self._event("agent.signalled", a, signal=signame)
            return self._status(a)

    async def pause(self, agent_id: str) -> AgentStatus:
        async with self._hold(agent_id) as a:
            self._require(a, S.RUNNING, "pause")
            self._freeze(a, True)
            self._move(a, S.PAUSED, "paused by request")
            self._event("agent.paused", a)
            return self._status(a)

    async def resume(self, agent_id: str) -> AgentStatus:
        async with self._hold(agent_id) as a:
            self._require(a, S.PAUSED, "resume")
            self._freeze(a, False)
            self._move(a, S.RUNNING, "resumed by request")
            self._event("agent.resumed", a)
            return self._status(a)

    async def remove(self, agent_id: str) -> AgentStatus:
        """Stop the agent, then forget it: state record, cgroup and log files."""
        async with self._hold(agent_id) as a:
            await self._stop(a, None, sync=False)  # one commit with the removal below
            final = self._status(a)
            a.forgotten = True
            self._store.discard(agent_id)
            await self._durable()
            self._unsaved.discard(agent_id)
            if a.cgroup is not None:
                await a.cgroup.remove()
            self._logs.remove(agent_id)
            del self._agents[agent_id]
            self._event("agent.removed", a)
            return final

    def status(self, agent_id: str) -> AgentStatus:
        return self._status(self._get(agent_id))

    def statuses(self) -> list[AgentStatus]:
        return [self._status(a) for a in self._agents.values()]

    def agent_ids(self) -> list[str]:
        """The hosted agents' ids: cheap, unlike :meth:`statuses`."""
        return list(self._agents)

    def summaries(self) -> list[AgentSummary]:
        """One line per agent for heartbeats: cheap, unlike :meth:`statuses`."""
        return [AgentSummary(a.id, a.lc.state, a.epoch, a.pid) for a in self._agents.values()]

    def spec(self, agent_id: str) -> AgentSpec:
        return self._get(agent_id).spec

    def tail_logs(
        self, agent_id: str, stream: Stream, lines: int, since: float | None = None
    ) -> list[str]:
        self._get(agent_id)
        return self._logs.tail(agent_id, stream, lines, since)

    def follow_logs(
        self, agent_id: str, stream: Stream, interval: float = 0.5
    ) -> AsyncIterator[str]:
        self._get(agent_id)
        return self._logs.follow(agent_id, stream, interval=interval)

    def node_metrics(self) -> NodeMetrics:
        return node_metrics(self.config.state_dir)

    async def shutdown(self, mode: Literal["drain", "detach"] = "drain") -> None:
        """drain: stop every agent (in parallel); detach: leave them running for re-adoption."""
        if self._closed:
            return
        self._closed = True
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if mode == "drain":
            agents = list(self._agents.values())
            # Settled agents keep their state (a failed one stays failed for the record).
            live = [a for a in agents if a.lc.state not in FINAL]
            for a in live:
                a.keep_desired = True
            async with asyncio.TaskGroup() as tg:
                for a in live:
                    tg.create_task(self._stop_locked(a))
            for a in agents:
                if a.cgroup is not None:
                    await a.cgroup.remove()
            if self._cgroups is not None:
                self._cgroups.remove_base()
        else:
            for a in self._agents.values():
                if a.task is not None:
                    a.task.cancel()
                if a.popen is not None:
                    release(a.popen)
                self._save(a)
        await self._durable()
        await self._cancel_tasks()

    async def tick(self) -> None:
        """One metrics pass over every live agent (the metrics loop calls this)."""
        live = [a for a in self._agents.values() if a.pid is not None and a.lc.state in LIVE]
        table = self._trees.table() if any(a.cgroup is None for a in live) else None
        if table is not None:
            self._adopt_orphans(table)
        for i, a in enumerate(live):
            if i and i % 64 == 0:
                await asyncio.sleep(0)  # let exits and commands through during a big tick
            if a.pid is None or a.lc.state not in LIVE:
                continue
            self._sample(a, table)
            rss = a.metrics.rss_bytes if a.metrics else 0
            if a.lc.state in (S.RUNNING, S.PAUSED) and memory_exceeded(a.spec.limits, a.plan, rss):
                self._limit_exceeded(a)
            try:
                self._logs.rotate_if_needed(a.id, a.spec.logs)
            except LogsDropped as exc:  # e.g. disk full: the agent logs on, the excess is gone
                log.warning("%s", exc)
                self._event("agent.logs_dropped", a, error=str(exc))
            except OSError:
                pass
            self._emit(a)
        self._trees.end_tick()
        for agent_id in list(self._unsaved):  # a full disk may have room again
            if (a := self._agents.get(agent_id)) is not None:
                self._save(a, durable=True)
            else:
                self._unsaved.discard(agent_id)
        await self._durable()
        # A burst of exits can overflow the loop's signal pipe and lose a
        # SIGCHLD; one reap pass per tick makes sure no exit goes unseen.
        self._reaper.reap()
        self._reaper.poll_foreign()

    # -- the per-agent loop -------------------------------------------------------

    def _launch(self, a: _Agent, reason: str) -> None:
        """Start a run now (from a settled state) and the loop that follows it."""
        a.manual_stop = a.keep_desired = False
        self._ensure_cgroup(a)
        if self._spawn(a, reason, durable=True):
            a.task = self._track(self._supervise(a), f"agent-{a.id}")

    def _spawn(self, a: _Agent, reason: str, *, durable: bool = False) -> bool:
        """Start one run. ``durable``: an operator's placement or start (see state_store)."""
        spec = a.spec
        try:
            out, err = self._logs.open_for_spawn(a.id, spec.logs)
        except OSError as exc:
            self._spawn_failed(a, f"cannot open log files: {exc}")
            return False
        env = dict(self.config.extra_env(spec)) if self.config.extra_env else {}
        env[AGENT_ID_ENV] = a.id
        try:
            popen = spawn(
                spec,
                stdout=out,
                stderr=err,
                extra_env=env,
                rlimits=rlimits_for(spec.limits, a.plan),
                cgroup_procs=a.cgroup.procs_file if a.cgroup is not None else None,
            )
        except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            self._spawn_failed(a, f"cannot spawn: {exc}")
            return False
        finally:
            os.close(out)
            os.close(err)
        pid = popen.pid
        try:
            # Read before the reaper can collect it: a zombie still has its /proc entry.
            a.create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            a.create_time = None
        a.exit = self._reaper.watch(pid)
        a.exit.add_done_callback(_mark_reaped(popen))
        a.popen, a.pid = popen, pid
        a.started_at = self._now()
        a.seen, a.cause, a.frozen = {}, None, False
        a.health, a.metrics = HealthVerdict.UNKNOWN, None
        self._move(a, S.STARTING, reason)
        # Before any await: a node agent killed from here on re-adopts this process.
        self._save(a, durable=durable)
        if spec.start_seconds == 0:
            self._running(a, "started")
        return True

    def _running(self, a: _Agent, reason: str) -> None:
        self._move(a, S.RUNNING, reason)
        self._event("agent.started", a, pid=a.pid, restarts=a.restarts)

    def _spawn_failed(self, a: _Agent, reason: str) -> None:
        if a.lc.state is not S.FAILED:
            self._move(a, S.FAILED, reason)
        self._save(a, durable=True)  # may be a first placement: its spec must be kept
        self._event("agent.failed", a, reason=reason, escalate=False)

    async def _supervise(self, a: _Agent) -> None:
        try:
            while True:
                info = await self._watch_run(a)
                report = self._finish_run(a, info)
                decision = a.tracker.decide(report, self._now())
                if isinstance(decision, Restart):
                    a.restarts += 1
                    self._move(a, S.BACKOFF, decision.reason)
                    self._event("agent.restarting", a, delay=decision.delay, restarts=a.restarts)
                    if decision.delay > 0:
                        a.wake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(decision.delay):
                                await a.wake.wait()
                    if a.manual_stop:
                        self._settle(a, S.STOPPED, "stopped by request")
                        return
                    if not self._spawn(a, "restarted"):
                        return
                elif isinstance(decision, GiveUp):
                    self._settle(a, S.FAILED, decision.reason)
                    self._event(
                        "agent.failed", a, reason=decision.reason, escalate=decision.escalate
                    )
                    return
                else:
                    to = S.STOPPED if a.manual_stop or a.lc.state is S.STOPPING else S.EXITED
                    self._settle(a, to, decision.reason)
                    return
        except asyncio.CancelledError:
            raise  # detach / shutdown: leave the process alone
        except Exception as exc:  # a bug here must not take the whole node agent down
            log.exception("supervision of %s failed", a.id)
            with contextlib.suppress(ContractError):
                self._settle(a, S.FAILED, f"internal error: {exc}")

    async def _watch_run(self, a: _Agent) -> ExitInfo:
        """Wait for the current run to end; promotes starting -> running on the way."""
        fut = a.exit
        assert fut is not None
        if a.lc.state is S.STARTING:
            await asyncio.wait({fut}, timeout=a.spec.start_seconds)
            if fut.done():
                return fut.result()
            self._running(a, f"alive after {a.spec.start_seconds:g} s")
        if a.spec.health is None:
            return await asyncio.shield(fut)
        monitor = self._health_monitor(a)
        async with asyncio.TaskGroup() as tg:
            checks = tg.create_task(monitor.run(), name=f"health-{a.id}")
            try:
                return await asyncio.shield(fut)
            finally:
                checks.cancel()

    def _finish_run(self, a: _Agent, info: ExitInfo) -> ExitReport:
        """Record an exit; kill what the run left behind (its group, cgroup, descendants)."""
        failed_start = a.lc.state is S.STARTING and not a.manual_stop
        ran_for = self._now() - a.started_at
        self._kill_tree(a, signal.SIGKILL)
        a.lc.record_exit(info.code, info.signal)
        a.pid = a.popen = a.exit = None
        a.create_time = None
        a.seen = {}
        a.metrics = None
        report = ExitReport(
            code=info.code,
            signal=info.signal,
            manual_stop=a.manual_stop,
            failed_start=failed_start,
            ran_for=ran_for,
            cause=a.cause,
        )
        self._event(
            "agent.exited",
            a,
            code=info.code,
            signal=info.signal,
            ran_for=round(ran_for, 3),
            failed_start=failed_start,
            reason=report.describe(),
        )
        return report

    def _settle(self, a: _Agent, to: AgentState, reason: str) -> None:
        self._move(a, to, reason)
        self._save(a)
        if to is S.STOPPED:
            self._event("agent.stopped", a, reason=reason)

    # -- stopping ------------------------------------------------------------------

    async def _stop_locked(self, a: _Agent) -> None:
        async with a.lock:
            await self._stop(a, None)

    async def _stop(
        self, a: _Agent, grace: float | None, reason: str = "stop requested", *, sync: bool = True
    ) -> None:
        """Bring the agent to ``stopped``; the caller holds ``a.lock``.

        ``sync``: the stop is durable before this returns (else the caller commits)."""
        a.manual_stop = True
        state = a.lc.state
        if state in (S.STARTING, S.RUNNING, S.PAUSED):
            self._move(a, S.STOPPING, reason)
            self._begin_kill(a, a.spec.stop_timeout if grace is None else grace)
        elif state is S.BACKOFF:
            a.wake.set()
        elif state in (S.PENDING, S.EXITED, S.FAILED):
            self._settle(a, S.STOPPED, reason)
        # The operator's intent must outlive a host crash; saved after the
        # signal so that stopping many agents starts every grace period at once
        # rather than one fsync after another.
        self._save(a, durable=True)
        if sync:
            await self._durable()
        # STOPPING (a restart already under way): the manual flag makes the loop stay down.
        if a.task is not None:
            await asyncio.shield(a.task)
        if a.lc.state is not S.STOPPED:  # e.g. the loop died on a bug and left it failed
            self._settle(a, S.STOPPED, reason)

    def _begin_kill(self, a: _Agent, grace: float) -> None:
        if a.killer is None or a.killer.done():
            a.killer = self._track(self._terminate(a, grace), f"stop-{a.id}")

    async def _terminate(self, a: _Agent, grace: float) -> None:
        fut = a.exit
        if fut is None or fut.done() or a.pid is None:
            return
        if a.cgroup is None:
            self._refresh_tree(a)
        sig = signal.Signals[a.spec.stop_signal]
        signal_group(a.pid, sig)
        signal_known(a.seen, sig, skip_group=a.pid)
        if a.frozen:  # a stopped or frozen process cannot act on the signal
            self._freeze(a, False)
        await asyncio.wait({fut}, timeout=grace)
        if fut.done():
            # The loop has already cleaned up after this run (and may have started
            # the next one, which is not ours to kill).
            return
        self._kill_tree(a, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT):
                await asyncio.shield(fut)

    def _kill_tree(self, a: _Agent, sig: int) -> None:
        """Signal the run's group, cgroup and every descendant seen (checked by create time)."""
        if a.pid is not None:
            signal_group(a.pid, sig)
        if a.cgroup is not None and sig == signal.SIGKILL:
            a.cgroup.kill()
        signal_known(a.seen, sig)

    def _restart_for(self, a: _Agent, cause: str) -> None:
        """End the run on the supervisor's own initiative; the loop then restarts it."""
        if a.lc.state not in (S.RUNNING, S.PAUSED):
            return
        a.cause = cause
        self._move(a, S.STOPPING, cause)
        self._begin_kill(a, a.spec.stop_timeout)

    def _limit_exceeded(self, a: _Agent) -> None:
        rss = a.metrics.rss_bytes if a.metrics else 0
        self._event(
            "agent.limit_exceeded",
            a,
            limit="memory",
            rss_bytes=rss,
            max_bytes=a.spec.limits.memory_bytes,
            mechanism="watchdog",
        )
        self._restart_for(a, "memory limit exceeded")

    # -- pause, health, cgroups --------------------------------------------------------

    def _freeze(self, a: _Agent, frozen: bool) -> None:
        if a.cgroup is not None:
            try:
                a.cgroup.freeze(frozen)
                a.frozen = frozen
                return
            except OSError:
                pass  # no freezer here: fall back to signals
        if a.pid is not None:
            sig = signal.SIGSTOP if frozen else signal.SIGCONT
            signal_group(a.pid, sig)
            signal_known(a.seen, sig, skip_group=a.pid)
        a.frozen = frozen

    def _health_monitor(self, a: _Agent) -> HealthMonitor:
        spec = a.spec
        assert spec.health is not None
        pid, created = a.pid, a.create_time
        assert pid is not None
        probe = make_probe(
            spec.health.check,
            alive=lambda: same_process(pid, created),
            reaper=self._reaper,
            cwd=spec.cwd,
            env=build_env(spec),
            user=spec.user,  # the check runs as the agent does, never as the node
            group=spec.group,
        )

        def changed(verdict: HealthVerdict, error: str) -> None:
            a.health = verdict
            a.message = f"health: {verdict.value}" + (f" ({error})" if error else "")
            if verdict is HealthVerdict.UNHEALTHY:
                self._event("agent.unhealthy", a, error=error)
            elif verdict is HealthVerdict.HEALTHY:
                self._event("agent.healthy", a)
            self._emit(a)
            restart = spec.health is not None and spec.health.restart_on_unhealthy
            if verdict is HealthVerdict.UNHEALTHY and restart:
                self._restart_for(a, "unhealthy")

        return HealthMonitor(spec.health, probe, changed, active=lambda: not a.frozen)

    def _ensure_cgroup(self, a: _Agent) -> None:
        if self._cgroups is not None and (a.cgroup is None or not a.cgroup.exists()):
            try:
                a.cgroup = self._cgroups.agent(a.id)
            except OSError as exc:
                log.warning("no cgroup for %s: %s", a.id, exc)
                a.cgroup = None
        a.plan = apply_limits(a.spec.limits, a.cgroup, a.spec.user)

    # -- process trees -------------------------------------------------------------

    def _sample(self, a: _Agent, table: ProcTable | None) -> None:
        assert a.pid is not None
        cgroup_pids = a.cgroup.pids() if a.cgroup is not None else None
        a.metrics, a.seen = self._trees.sample(a.pid, cgroup_pids, a.seen, table)

    def _refresh_tree(self, a: _Agent) -> None:
        """Before a stop without cgroup: note descendants that appeared since the last tick."""
        assert a.pid is not None
        self._adopt_orphans(self._trees.table(_TABLE_MAX_AGE))
        a.seen = self._trees.snapshot(a.pid, a.seen, _TABLE_MAX_AGE)

    def _adopt_orphans(self, table: ProcTable) -> None:
        roots = {a.pid: a.id for a in self._agents.values() if a.pid is not None}
        for agent_id, procs in self._trees.orphans(table, roots).items():
            a = self._agents.get(agent_id)
            if a is not None and a.pid is not None:
                a.seen.update(procs)

    # -- re-adoption -----------------------------------------------------------------

    def _readopt(self) -> None:
        records = self._store.load_all()
        if self._cgroups is not None:
            self._cgroups.prune(set(records))
        for record in records.values():
            a = _Agent(record.spec, record.epoch, self._rng)
            if record.history:
                # Its past, as the previous node agent last wrote it; what
                # happens now (re-adopted, respawned) is added on top.
                a.lc.history.clear()
                a.lc.history.extend(record.history)
            a.restarts = record.restarts
            a.manual_stop = record.manual_stop
            self._agents[a.id] = a
            if record.cgroup and Path(record.cgroup).is_dir():
                a.cgroup = AgentCgroup(Path(record.cgroup))
            if record.pid and record.create_time and same_process(record.pid, record.create_time):
                self._adopt(a, record)
            elif record.manual_stop or not record.desired_running:
                final = S(record.last_state) if S(record.last_state) in FINAL else S.STOPPED
                self._move(a, final, f"{final.value} before the node agent restarted")
            else:
                self._respawn_after_restart(a)

    def _adopt(self, a: _Agent, record: AgentRecord) -> None:
        assert record.pid is not None and record.create_time is not None
        self._ensure_cgroup(a)
        a.pid, a.create_time = record.pid, record.create_time
        a.exit = self._reaper.watch_foreign(record.pid, record.create_time)
        a.started_at = self._now() - max(0.0, time.time() - record.create_time)
        self._move(a, S.RUNNING, "re-adopted")
        self._save(a)
        self._event("agent.readopted", a, pid=a.pid)
        a.task = self._track(self._supervise(a), f"agent-{a.id}")

    def _respawn_after_restart(self, a: _Agent) -> None:
        report = ExitReport()  # status unknown: it died while we were away
        decision = a.tracker.decide(report, self._now())
        reason = f"{report.describe()} while the node agent was away"
        if isinstance(decision, Restart):
            a.restarts += 1
            self._move(a, S.BACKOFF, reason)
            self._ensure_cgroup(a)
            if self._spawn(a, "restarted after node agent restart"):
                a.task = self._track(self._supervise(a), f"agent-{a.id}")
        elif isinstance(decision, GiveUp):
            self._settle(a, S.FAILED, decision.reason)
        else:
            self._settle(a, S.EXITED, reason)

    # -- plumbing --------------------------------------------------------------------

    @asynccontextmanager
    async def _hold(self, agent_id: str) -> AsyncIterator[_Agent]:
        """The agent, locked against other commands; NOT_FOUND if removed meanwhile."""
        a = self._get(agent_id)
        async with a.lock:
            if self._agents.get(agent_id) is not a:
                raise ContractError(ErrorCode.NOT_FOUND, f"agent {agent_id!r} was removed")
            yield a

    def _require_open(self) -> None:
        if self._closed:
            raise ContractError(ErrorCode.UNAVAILABLE, "the node agent is shutting down")

    def _get(self, agent_id: str) -> _Agent:
        a = self._agents.get(agent_id)
        if a is None:
            raise ContractError(ErrorCode.NOT_FOUND, f"no agent {agent_id!r} on this node")
        return a

    @staticmethod
    def _require(a: _Agent, state: AgentState, op: str) -> None:
        if a.lc.state is not state:
            raise ContractError(
                ErrorCode.INVALID_STATE,
                f"cannot {op} agent {a.id}: it is {a.lc.state.value}, not {state.value}",
            )

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _move(self, a: _Agent, to: AgentState, reason: str) -> None:
        a.lc.transition(to, reason)
        # Not durable (no fsync): the history must outlive a node agent crash,
        # which the page cache does; a host crash may cost its tail.
        self._save(a)
        if to not in LIVE:
            a.message = ""
        self._emit(a)

    def _status(self, a: _Agent) -> AgentStatus:
        lc = a.lc
        return AgentStatus(
            agent_id=a.id,
            node_id=self.config.node_id,
            state=lc.state,
            since=lc.since,
            reason=lc.reason,
            pid=a.pid,
            restarts=a.restarts,
            exit_code=lc.exit_code,
            exit_signal=lc.exit_signal,
            health=a.health,
            metrics=a.metrics,
            limits=dict(a.plan),
            epoch=a.epoch,
            history=list(lc.history),
            message=a.message,
        )

    def _emit(self, a: _Agent) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(self._status(a))
        except Exception:  # a listener's bug must not break supervision
            log.exception("on_status callback failed")

    def _event(self, kind: str, a: _Agent, **data: Any) -> None:
        if self._on_event is None:
            return
        data.setdefault("state", a.lc.state.value)
        try:
            self._on_event(kind, a.id, data)
        except Exception:
            log.exception("on_event callback failed")

    def _save(self, a: _Agent, *, durable: bool = False) -> None:
        if a.forgotten:  # a removed agent's record is never written back
            return
        state = a.lc.state
        desired = state not in FINAL or a.keep_desired
        record = AgentRecord(
            spec=a.spec,
            epoch=a.epoch,
            pid=a.pid,
            create_time=a.create_time,
            restarts=a.restarts,
            manual_stop=a.manual_stop and not a.keep_desired,
            desired_running=desired,
            cgroup=str(a.cgroup.path) if a.cgroup is not None else None,
            last_state=state.value,
            history=list(a.lc.history),
        )
        try:
            self._store.write(record, durable=durable)
        except OSError as exc:
            # Said once per failing spell (the node's own log may be on that
            # disk too); every metrics tick tries again until it works.
            if a.id not in self._unsaved:
                self._unsaved.add(a.id)
                log.error("cannot save the state of %s: %s", a.id, exc)
                self._event("agent.state_unsaved", a, error=str(exc))
            a.message = f"state not saved: {exc.strerror or exc}"
            return
        if a.id in self._unsaved:
            self._unsaved.discard(a.id)
            log.info("the state of %s is saved again", a.id)
            self._event("agent.state_saved", a)
            if a.message.startswith("state not saved"):
                a.message = ""

    async def _durable_status(self, a: _Agent) -> AgentStatus:
        """The agent's status now, returned once it is durable (a command's reply)."""
        status = self._status(a)
        await self._durable()
        return status

    async def _durable(self) -> None:
        """Wait for the group commit of every durable write made so far (state_store).

        Commands await this before they reply; durable writes that no command
        waits for are committed by the next one, at the latest on the next
        metrics tick. A failed commit is logged by the store and keeps its
        writes queued for the next.
        """
        with contextlib.suppress(OSError):
            await self._store.sync()

    def _track(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        if self._metrics_task is not None:
            tasks.append(self._metrics_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _metrics_loop(self) -> None:
        interval = self.config.metrics_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception:
                log.exception("metrics tick failed")


def _mark_reaped(popen: subprocess.Popen[bytes]) -> Callable[[asyncio.Future[ExitInfo]], None]:
    def done(fut: asyncio.Future[ExitInfo]) -> None:
        if not fut.cancelled():
            mark_reaped(popen, fut.result())

    return done
