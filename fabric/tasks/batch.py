"""Batch tasks: type ``exec`` runs one command once, as a one-shot agent.

This is Nomad's batch job over the queue. The dispatcher that holds an
``exec`` task runs it itself, with the controller's own machinery::

    payload ──(bad: dead letter, invalid_payload; never runs)
      ─▶ deployment exec-<task id>-<attempt>: replicas 1, restart never,
         on_partition stop, the payload's constraints   (KV, like `fabric run`)
      ─▶ the leader places it; the node spawns it
      ─▶ watched through the controller's live view (statuses, heartbeats)
      ─▶ exited: its status (exit code, signal, times) and the tails of its
         stdout/stderr from its node (the ``status`` and ``logs`` commands
         `fabric inspect` and `fabric logs` use)
      ─▶ deployment removed ─▶ a TaskResult like any worker's: exit 0 is a
         success with an :class:`~schemas.task.ExecResult`, anything else a
         failed attempt (retried per ``max_attempts``)

No run twice at once, no run forever:

* The agent's name is derived from the task id and the attempt number, and
  the attempt number from the task's record, so a dispatcher that takes
  over a redelivered task (its controller died mid-run) finds the same
  deployment and watches it instead of starting another. Found gone while
  the record says it was running: the outcome is unknown, the attempt counts
  as lost, and the next attempt (a new name) runs only after it is gone.
* The one-shot keeps running while no controller watches it, but it has the
  payload's ``timeout``, counted from the attempt's start in the task record:
  the next dispatcher stops it once that has passed, and the task's
  redelivery (ack wait) guarantees a next dispatcher.
* One no dispatcher will ever watch again (its task's message deleted, its
  redeliveries spent) is removed by the leader's sweep once it is
  ``sweep_grace`` past its timeout (the spec's ``fabric.exec/expires`` label).
* A one-shot whose node is lost would be re-placed by the leader (as any
  agent): seen moved, it is removed and the attempt counts as lost; its first
  copy stopped itself already (``on_partition: stop``).
* No node matches the constraints within ``place_wait``: removed, and the
  task goes back to the queue without using an attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import msgspec
import nats.errors

from fabric.cancelled import raise_if_cancelled
from fabric.controller.registry import mutate
from fabric.spec_policy import check_cwd, check_env
from schemas import subjects
from schemas.agent import (
    AgentSpec,
    AgentState,
    AgentStatus,
    RestartPolicy,
    RestartPolicyKind,
)
from schemas.api import Constraints, Deployment, DeploymentRecord
from schemas.codec import decode_reply, encode
from schemas.command import CommandResult, StatusAgent, TailLogs
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.ids import validate_id
from schemas.task import EXEC_TASK_TYPE, ExecPayload, ExecResult, Task, TaskOutcome, TaskResult

__all__ = [
    "EXEC_TASK_TYPE",
    "BatchRunner",
    "ControllerFleet",
    "ExecFleet",
    "ExecSettings",
    "clip_tail",
    "exec_agent_id",
    "one_shot",
    "parse_payload",
]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({AgentState.EXITED, AgentState.FAILED, AgentState.STOPPED})
_TAIL_BYTES = 32 * 1024
"""Output kept per stream in a result: a record must stay well under 1 MiB."""


# --- pure ------------------------------------------------------------------------


def parse_payload(payload: Any) -> ExecPayload:
    """The task's payload as an :class:`ExecPayload`; ContractError(INVALID_PAYLOAD) if not,
    or the spec policy's code (fabric.spec_policy) for a reserved env key or a bad cwd,
    which every node would refuse."""
    try:
        parsed = msgspec.convert(payload, ExecPayload, strict=True)
    except msgspec.ValidationError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, f"bad exec payload: {exc}") from None
    check_env(parsed.env, "exec payload")
    if parsed.cwd is not None:
        check_cwd(parsed.cwd)
    return parsed


def exec_agent_id(task_id: str, attempt: int, retry: int = 0) -> str:
    """The one-shot agent of ``task_id``'s attempt ``attempt`` (of the operator's
    ``retry``-th retry): the same for every dispatcher that handles that
    attempt, different for any other."""
    run = f"{attempt}" if retry == 0 else f"r{retry}-{attempt}"
    try:
        return validate_id(f"exec-{task_id}-{run}", "agent id")
    except ContractError:
        pass  # too long: a digest of the id instead
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    return f"exec-{digest}-{run}"


TASK_LABEL = "fabric.exec/task"
EXPIRES_LABEL = "fabric.exec/expires"
"""Labels of a one-shot's spec: its task, and when its attempt's timeout ends
(what :meth:`BatchRunner.sweep` reads when no dispatcher watches it)."""


def one_shot(
    payload: ExecPayload, agent_id: str, task_id: str = "", expires: datetime | None = None
) -> Deployment:
    """The deployment that runs ``payload`` once on a node matching its constraints."""
    labels = {TASK_LABEL: task_id} if task_id else {}
    if expires is not None:
        labels[EXPIRES_LABEL] = expires.isoformat()
    spec = AgentSpec(
        name=agent_id,
        argv=list(payload.argv),
        env=dict(payload.env),
        cwd=payload.cwd,
        start_seconds=0.0,
        stop_timeout=payload.stop_timeout,
        restart=RestartPolicy(policy=RestartPolicyKind.NEVER),
        limits=payload.limits,
        # A node cut off from NATS stops it itself, so the copy the leader
        # places elsewhere never runs beside it.
        on_partition="stop",
        labels=labels,
    )
    constraints = Constraints(
        labels=dict(payload.constraints.labels),
        capabilities=list(payload.constraints.capabilities),
    )
    return Deployment(spec=spec, replicas=1, constraints=constraints)


def overdue(record: DeploymentRecord, now: datetime, grace: float) -> bool:
    """Whether ``record`` is a one-shot past its timeout by more than ``grace`` seconds."""
    stamp = record.deployment.spec.labels.get(EXPIRES_LABEL)
    if stamp is None or record.deleting:
        return False
    try:
        expires = datetime.fromisoformat(stamp)
    except ValueError:
        return False
    return now > expires + timedelta(seconds=grace)


def clip_tail(lines: Sequence[str], budget: int = _TAIL_BYTES) -> list[str]:
    """The last of ``lines`` that fit in ``budget`` characters (a longer last line: its end)."""
    out: list[str] = []
    for line in reversed(lines):
        if len(line) > budget:
            if not out:
                out.append(line[-budget:])
            break
        out.append(line)
        budget -= len(line)
    out.reverse()
    return out


def run_seconds(status: AgentStatus) -> float:
    """From its last spawn to ``status.since`` (its exit), from the node's history."""
    begun: datetime | None = None
    for change in status.history:
        if change.to_state is AgentState.STARTING:
            begun = change.at
    if begun is None:
        return 0.0
    return max(0.0, (status.since - begun).total_seconds())


def describe_end(status: AgentStatus, stderr: Sequence[str]) -> str | None:
    """None when the run succeeded (exit 0), else why the attempt failed."""
    if status.state is AgentState.EXITED and status.exit_code == 0:
        return None
    if status.state is AgentState.FAILED:
        why = f"could not run: {status.reason or 'failed'}"
    elif status.state is AgentState.STOPPED:
        why = f"stopped before it finished: {status.reason or 'by request'}"
    elif status.exit_signal:
        why = f"killed by {status.exit_signal}"
    else:
        why = f"exit code {status.exit_code}"
    last = [line for line in stderr if line.strip()][-3:]
    if last:
        why += "; stderr: " + " | ".join(last)
    return why[:4096]


# --- what it needs from a controller -----------------------------------------------


class ExecFleet(Protocol):
    """The controller's parts a batch run uses (a fake in unit tests)."""

    def record(self, name: str) -> DeploymentRecord | None: ...
    def one_shots(self) -> list[DeploymentRecord]: ...
    def leads(self) -> bool: ...
    def forget_gone(self) -> int: ...
    async def create(self, deployment: Deployment, created_by: str) -> None: ...
    async def remove(self, name: str) -> None: ...
    def observed(self, agent_id: str, node_id: str, epoch: int) -> AgentState | None: ...
    def running_on(self, agent_id: str) -> list[str]: ...
    async def command(
        self, agent_id: str, node_id: str, command: StatusAgent | TailLogs
    ) -> CommandResult: ...


class ControllerFleet:
    """:class:`ExecFleet` over a live :class:`~fabric.controller.service.Controller`:
    deployments written to its registry (compare-and-set, like the operator API),
    agents observed through its statuses and heartbeats, node commands signed
    with its own key."""

    def __init__(self, controller: Any) -> None:
        self.c = controller

    def _agents_kv(self) -> Any:
        return self.c._require_buckets().agents

    def record(self, name: str) -> DeploymentRecord | None:
        mirror = self.c.deployments
        found = mirror.items.get(name) if mirror is not None else None
        return None if found is None else found[0]

    def one_shots(self) -> list[DeploymentRecord]:
        mirror = self.c.deployments
        if mirror is None:
            return []
        items = list(mirror.items.values())
        return [r for r, _ in items if EXPIRES_LABEL in r.deployment.spec.labels]

    def leads(self) -> bool:
        lease = self.c.lease
        return lease is not None and lease.valid()

    def forget_gone(self) -> int:
        """Drop the last statuses of one-shots whose deployment is gone: every
        exec task has a name of its own, so the controller's status map would
        otherwise grow with each one."""
        mirror = self.c.deployments
        if mirror is None:
            return 0
        gone = [
            agent_id
            for agent_id in self.c.statuses
            if agent_id.startswith("exec-") and agent_id not in mirror.items
        ]
        for agent_id in gone:
            del self.c.statuses[agent_id]
        return len(gone)

    async def create(self, deployment: Deployment, created_by: str) -> None:
        def change(current: DeploymentRecord | None) -> DeploymentRecord | None:
            if current is not None:
                return current  # made already (by us before a crash): watched, not redone
            return DeploymentRecord(deployment=deployment, created_by=created_by[:256])

        done = await mutate(self._agents_kv(), deployment.name, DeploymentRecord, change)
        if done.revision is not None:
            self.c.deployments.apply(deployment.name, done.value, done.revision)

    async def remove(self, name: str) -> None:
        def change(current: DeploymentRecord | None) -> DeploymentRecord | None:
            if current is None or current.deleting:
                return current
            return msgspec.structs.replace(current, deleting=True)

        done = await mutate(self._agents_kv(), name, DeploymentRecord, change)
        if done.revision is not None:
            self.c.deployments.apply(name, done.value, done.revision)

    def observed(self, agent_id: str, node_id: str, epoch: int) -> AgentState | None:
        """Its state at ``epoch`` on ``node_id``: a final one from either source wins
        (a status message may be lost; a heartbeat comes every interval)."""
        states: list[AgentState] = []
        status = self.c.statuses.get(agent_id, {}).get(node_id)
        if status is not None and status.epoch >= epoch:
            states.append(status.state)
        live = self.c.live.get(node_id)
        summary = live.agents.get(agent_id) if live is not None else None
        if summary is not None and summary.epoch >= epoch:
            states.append(summary.state)
        for state in states:
            if state in _TERMINAL:
                return state
        return states[0] if states else None

    def running_on(self, agent_id: str) -> list[str]:
        return sorted(
            node_id
            for node_id, live in self.c.live.items()
            if (s := live.agents.get(agent_id)) is not None and s.state not in _TERMINAL
        )

    async def command(
        self, agent_id: str, node_id: str, command: StatusAgent | TailLogs
    ) -> CommandResult:
        token = self.c.issuer.mint(
            self.c.config.name, ["read"], agent=agent_id, node=node_id, ttl=30
        )
        body = encode(msgspec.structs.replace(command, token=token))
        msg = await self.c.nc.request(
            subjects.agent_commands(agent_id), body, timeout=self.c.config.command_timeout
        )
        reply = decode_reply(msg.data)
        if isinstance(reply, ErrorReply):
            raise ContractError(reply.code, reply.message)
        return reply


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecSettings:
    place_wait: float = 30.0
    """How long a one-shot may wait for a node matching its constraints."""
    poll: float = 0.1
    """How often the live view is looked at while it runs (memory only)."""
    gone_wait: float = 30.0
    """How long to wait for a removed one-shot to stop before the next attempt."""
    command_tries: int = 3
    sweep_every: float = 10.0
    sweep_grace: float = 120.0
    """A one-shot still there this long after its timeout has no dispatcher
    watching it (its task's message was deleted, or never comes back): the
    leader removes it."""


@dataclass(slots=True)
class _Outcome:
    kind: Literal["succeeded", "failed", "retry"]
    error: str | None = None
    result: ExecResult | None = None
    node_id: str | None = None


class BatchRunner:
    """Runs ``exec`` tasks as one-shot agents on ``fleet``."""

    def __init__(self, fleet: ExecFleet, settings: ExecSettings | None = None) -> None:
        self.fleet = fleet
        self.settings = settings or ExecSettings()

    async def run(
        self,
        task: Task,
        payload: ExecPayload,
        attempt: int,
        *,
        resumed: bool,
        since: datetime | None = None,
        limit: float | None = None,
    ) -> tuple[TaskResult, str | None]:
        """Run (or, ``resumed``, go on watching) attempt ``attempt`` of ``task``:
        its result, and the node it ran on when known.

        ``since``: when the attempt began (its record's ``started_at``; kept
        across dispatchers, so the payload's timeout runs from there).
        ``limit``: seconds left before the task's deadline, if it has one.
        """
        agent_id = exec_agent_id(task.id, attempt, task.retry)
        begun = utc_now()
        run_limit = payload.timeout if limit is None else min(payload.timeout, limit)
        expires = (since or begun) + timedelta(seconds=run_limit)
        outcome = await self._run(task, payload, attempt, resumed, expires, run_limit)
        kind = {
            "succeeded": TaskOutcome.SUCCEEDED,
            "failed": TaskOutcome.FAILED,
            "retry": TaskOutcome.RETRY,
        }[outcome.kind]
        result = TaskResult(
            task_id=task.id,
            agent_id=agent_id,
            attempt=attempt,
            outcome=kind,
            result=None if outcome.result is None else msgspec.to_builtins(outcome.result),
            error=outcome.error,
            started_at=begun,
            finished_at=utc_now(),
        )
        return result, outcome.node_id

    async def _run(
        self,
        task: Task,
        payload: ExecPayload,
        attempt: int,
        resumed: bool,
        expires: datetime,
        run_limit: float,
    ) -> _Outcome:
        fleet, settings = self.fleet, self.settings
        agent_id = exec_agent_id(task.id, attempt, task.retry)
        if attempt > 1:
            # The previous attempt's one-shot, if a failed removal left it: gone
            # first, so two attempts never run side by side.
            previous = exec_agent_id(task.id, attempt - 1, task.retry)
            if fleet.record(previous) is not None or fleet.running_on(previous):
                await self._gone(previous)
        record = fleet.record(agent_id)
        if record is not None and record.deleting:
            # Being removed: by a dispatcher that ran this attempt and stopped
            # before settling it (resumed: its outcome is lost), or after a
            # hand-back (not resumed: it never ran, the name is free once gone).
            await self._gone(agent_id)
            if resumed:
                return _Outcome("failed", f"one-shot {agent_id} was removed before it finished")
            record = fleet.record(agent_id)
        if record is None and resumed:
            # Our record says this attempt was under way, but its one-shot is
            # gone: it may have run. Count the attempt; never guess it did not.
            return _Outcome("failed", f"one-shot {agent_id} vanished while its attempt ran")
        if record is None:
            deployment = one_shot(payload, agent_id, task.id, expires)
            await fleet.create(deployment, task.submitted_by or "exec")
        loop = asyncio.get_running_loop()
        place_until = loop.time() + settings.place_wait
        node_id: str | None = None
        epoch = 0
        while True:
            raise_if_cancelled()
            now = loop.time()
            record = fleet.record(agent_id)
            if record is None or record.deleting:
                await self._gone(agent_id)
                return _Outcome("failed", f"one-shot {agent_id} was removed before it finished")
            placed = record.replicas[0] if record.replicas else None
            if placed is not None and placed.failed:
                await self._remove(agent_id)
                return _Outcome("failed", f"could not run: {placed.reason or 'failed'}", None)
            if node_id is not None and (
                placed is None or placed.node_id != node_id or placed.epoch != epoch
            ):
                # The leader moved it: its node was lost, or it failed there.
                await self._remove(agent_id)
                why = f"{agent_id} was moved off node {node_id} (node lost, or it failed there)"
                return _Outcome("failed", why, node_id=node_id)
            if node_id is None and placed is not None and placed.node_id is not None:
                node_id, epoch = placed.node_id, placed.epoch
            if node_id is None:
                if now >= place_until:
                    # Gone before the hand-back, so its next delivery may use the name.
                    await self._gone(agent_id)
                    why = placed.reason if placed is not None and placed.reason else "not placed"
                    return _Outcome("retry", f"no node can run it yet: {why}")
            else:
                state = fleet.observed(agent_id, node_id, epoch)
                if state in _TERMINAL:
                    return await self._finish(agent_id, node_id, payload)
                if utc_now() > expires:
                    return await self._time_out(agent_id, node_id, payload, run_limit)
            await asyncio.sleep(settings.poll)  # wait-ok: a look at in-memory state

    async def sweep(self) -> list[str]:
        """Remove one-shots past their timeout by ``sweep_grace`` (leader only):
        the safety net for one no dispatcher watches any more. Returns their names."""
        if not self.fleet.leads():
            return []
        now = utc_now()
        stale = [
            r.name for r in self.fleet.one_shots() if overdue(r, now, self.settings.sweep_grace)
        ]
        for name in stale:
            log.warning("one-shot %s outlived its timeout unwatched: removing it", name)
            await self._remove(name)
        return stale

    async def sweep_forever(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.settings.sweep_every)  # wait-ok: a periodic pass
            self.fleet.forget_gone()  # every controller: its own memory
            try:
                await self.sweep()
            except (ContractError, nats.errors.Error, TimeoutError) as exc:
                log.info("one-shot sweep: %s", exc)

    async def _finish(self, agent_id: str, node_id: str, payload: ExecPayload) -> _Outcome:
        try:
            status = await self._ask(agent_id, node_id, StatusAgent())
            assert status.status is not None
            stdout, stderr = await self._tails(agent_id, node_id, payload.tail)
        except ContractError as exc:
            await self._remove(agent_id)
            return _Outcome(
                "failed", f"the end of {agent_id} on {node_id} is unknown: {exc}", node_id=node_id
            )
        await self._remove(agent_id)
        final = status.status
        result = ExecResult(
            exit_code=final.exit_code,
            signal=final.exit_signal,
            duration=round(run_seconds(final), 6),
            agent_id=agent_id,
            node_id=node_id,
            stdout=stdout,
            stderr=stderr,
        )
        error = describe_end(final, stderr)
        if error is None:
            return _Outcome("succeeded", None, result, node_id)
        return _Outcome("failed", error, result, node_id)

    async def _time_out(
        self, agent_id: str, node_id: str, payload: ExecPayload, limit: float
    ) -> _Outcome:
        with_tail = ""
        try:
            _, stderr = await self._tails(agent_id, node_id, min(payload.tail, 3))
            if stderr:
                with_tail = "; stderr: " + " | ".join(stderr)
        except ContractError:
            pass
        await self._remove(agent_id)
        # The next attempt must not start beside this one.
        await self._gone(agent_id)
        error = f"timeout: still running after {limit:g} s; stopped{with_tail}"
        return _Outcome("failed", error[:4096], node_id=node_id)

    async def _tails(self, agent_id: str, node_id: str, lines: int) -> tuple[list[str], list[str]]:
        if lines <= 0:
            return [], []
        tails: list[list[str]] = []
        stream: Literal["stdout", "stderr"]
        for stream in ("stdout", "stderr"):
            reply = await self._ask(agent_id, node_id, TailLogs(stream=stream, lines=lines))
            tails.append(clip_tail(reply.logs.lines if reply.logs else []))
        return tails[0], tails[1]

    async def _ask(
        self, agent_id: str, node_id: str, command: StatusAgent | TailLogs
    ) -> CommandResult:
        """A read command to its node, tried a few times (a lost reply is harmless)."""
        tries = self.settings.command_tries
        for i in range(tries):
            try:
                return await self.fleet.command(agent_id, node_id, command)
            except (nats.errors.Error, TimeoutError) as exc:
                if i == tries - 1:
                    raise ContractError(ErrorCode.UNAVAILABLE, f"node {node_id}: {exc}") from None
        raise AssertionError("unreachable")

    async def _remove(self, agent_id: str) -> None:
        try:
            await self.fleet.remove(agent_id)
        except (ContractError, nats.errors.Error, TimeoutError) as exc:
            # Left for the next dispatcher of this task (it finds and removes it).
            log.warning("one-shot %s not removed: %s", agent_id, exc)

    async def _gone(self, agent_id: str) -> None:
        """Until no deployment and no node runs ``agent_id`` (bounded)."""
        await self._remove(agent_id)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.gone_wait
        while loop.time() < until:
            if self.fleet.record(agent_id) is None and not self.fleet.running_on(agent_id):
                return
            await asyncio.sleep(self.settings.poll)  # wait-ok: a look at in-memory state
        log.warning("one-shot %s still present after %.0f s", agent_id, self.settings.gone_wait)
