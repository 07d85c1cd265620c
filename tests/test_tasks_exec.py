"""Batch tasks (``exec``) through the whole stack: a real controller runs each
as a one-shot agent on a real ``fabric-node`` matching its constraints, and
stores its exit code, duration and output tail as the task's result.

The commands are small Python programs; those that must be seen running
write their pid to a file under the test's directory and wait for a gate
file, so the test steps through them without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import psutil
import pytest
from agents.harness import until
from fleetfixtures import Fleet, controller_config, running, stop_run
from natsfixtures import Clients, FabricPki
from workers.rig import TaskRig, fast_settings

from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tasks.batch import (
    BatchRunner,
    ControllerFleet,
    ExecSettings,
    clip_tail,
    describe_end,
    exec_agent_id,
    one_shot,
    parse_payload,
    run_seconds,
)
from fabric.tasks.records import DeadTask, TaskState
from fabric.tasks.stream import DEAD_STREAM, TASKS_STREAM
from schemas.agent import AgentState, AgentStatus, RestartPolicyKind, Transition
from schemas.api import Deployment, DeploymentRecord, ReplicaPlacement
from schemas.codec import decode
from schemas.command import CommandResult, LogLinesResult, StatusAgent, TailLogs
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.ids import validate_id
from schemas.node import NodeState
from schemas.task import Task, TaskOutcome, TaskResult

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# --- pure ---------------------------------------------------------------------


def test_payload_is_typed_and_limited() -> None:
    ok = parse_payload({"argv": ["echo", "hi"], "constraints": {"labels": {"zone": "b"}}})
    assert ok.argv == ["echo", "hi"] and ok.constraints.labels == {"zone": "b"}
    assert ok.timeout == 3600.0 and ok.tail == 50
    for bad in (
        None,
        {"argv": []},
        {"argv": "echo hi"},
        {"argv": ["x"], "shell": True},
        {"argv": ["x"], "timeout": 0},
        {"argv": ["x"], "tail": 5000},
        {"argv": ["x"], "env": {"1BAD": "v"}},
        {"argv": ["x" * 5000]},
        {"argv": ["x"], "constraints": {"labels": "zone=b"}},
    ):
        with pytest.raises(ContractError) as err:
            parse_payload(bad)
        assert err.value.code is ErrorCode.INVALID_PAYLOAD, bad


def test_agent_ids_are_deterministic_valid_and_per_attempt() -> None:
    assert exec_agent_id("job-1", 1) == "exec-job-1-1" == exec_agent_id("job-1", 1)
    assert exec_agent_id("job-1", 2) == "exec-job-1-2"
    assert exec_agent_id("job-1", 1, retry=2) == "exec-job-1-r2-1"
    long_id = "a" * 63
    ids = {exec_agent_id(long_id, n) for n in (1, 2)} | {exec_agent_id("b" * 63, 1)}
    assert len(ids) == 3
    assert all(validate_id(i, "agent id") == i for i in ids)


def test_one_shot_runs_once_where_the_constraints_say() -> None:
    payload = parse_payload(
        {
            "argv": ["make", "all"],
            "env": {"A": "1"},
            "cwd": "/tmp",
            "constraints": {"labels": {"zone": "b"}, "capabilities": ["gpu"]},
        }
    )
    d = one_shot(payload, "exec-t-1")
    assert (d.name, d.replicas, d.spec.argv, d.spec.shell) == (
        "exec-t-1",
        1,
        ["make", "all"],
        False,
    )
    assert d.spec.restart.policy is RestartPolicyKind.NEVER
    assert d.spec.on_partition == "stop" and d.spec.env == {"A": "1"} and d.spec.cwd == "/tmp"
    assert d.constraints.labels == {"zone": "b"} and d.constraints.capabilities == ["gpu"]


def test_tail_is_clipped_from_the_end() -> None:
    assert clip_tail(["a", "bb", "ccc"], budget=5) == ["bb", "ccc"]
    assert clip_tail(["a", "x" * 10], budget=4) == ["xxxx"]
    assert clip_tail([], budget=4) == []


def _status(state: AgentState, **kw: Any) -> AgentStatus:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    history = [
        Transition(from_state=AgentState.PENDING, to_state=AgentState.STARTING, at=t0, reason=""),
        Transition(
            from_state=AgentState.STARTING,
            to_state=state,
            at=t0 + timedelta(seconds=2.5),
            reason="",
        ),
    ]
    return AgentStatus(
        agent_id="exec-t-1",
        node_id="n1",
        state=state,
        since=t0 + timedelta(seconds=2.5),
        history=history,
        **kw,
    )


def test_end_of_run_described() -> None:
    ok = _status(AgentState.EXITED, exit_code=0)
    assert describe_end(ok, ["noise"]) is None and run_seconds(ok) == 2.5
    assert describe_end(_status(AgentState.EXITED, exit_code=3), ["", "boom"]) == (
        "exit code 3; stderr: boom"
    )
    killed = _status(AgentState.EXITED, exit_signal="SIGKILL")
    assert describe_end(killed, []) == "killed by SIGKILL"
    failed = _status(AgentState.FAILED, reason="cannot spawn: no such file")
    assert describe_end(failed, []) == "could not run: cannot spawn: no such file"


class FakeFleet:
    """An :class:`~fabric.tasks.batch.ExecFleet` the test steers by hand."""

    def __init__(self) -> None:
        self.records: dict[str, DeploymentRecord] = {}
        self.states: dict[str, AgentState] = {}
        self.created: list[str] = []
        self.removed: list[str] = []
        self.looked: list[tuple[str, int]] = []
        self.leader = True
        """Where the runner looked for its agent, in order."""

    def place(self, name: str, node_id: str | None, epoch: int = 1, reason: str = "") -> None:
        record = self.records[name]
        replica = ReplicaPlacement(agent_id=name, node_id=node_id, epoch=epoch, reason=reason)
        self.records[name] = msgspec.structs.replace(record, replicas=[replica])

    def record(self, name: str) -> DeploymentRecord | None:
        return self.records.get(name)

    def one_shots(self) -> list[DeploymentRecord]:
        return list(self.records.values())

    def leads(self) -> bool:
        return self.leader

    def forget_gone(self) -> int:
        return 0

    async def create(self, deployment: Deployment, created_by: str) -> None:
        self.created.append(deployment.name)
        self.records[deployment.name] = DeploymentRecord(deployment=deployment)

    async def remove(self, name: str) -> None:
        self.removed.append(name)
        self.records.pop(name, None)  # as the leader does once its node stopped it
        self.states.pop(name, None)

    def observed(self, agent_id: str, node_id: str, epoch: int) -> AgentState | None:
        self.looked.append((node_id, epoch))
        return self.states.get(agent_id)

    def running_on(self, agent_id: str) -> list[str]:
        state = self.states.get(agent_id)
        return ["n1"] if state is not None and state is AgentState.RUNNING else []

    async def command(
        self, agent_id: str, node_id: str, command: StatusAgent | TailLogs
    ) -> CommandResult:
        if isinstance(command, TailLogs):
            lines = ["out"] if command.stream == "stdout" else []
            return CommandResult(
                op="logs", node_id=node_id, logs=LogLinesResult(stream=command.stream, lines=lines)
            )
        status = _status(self.states[agent_id], exit_code=0)
        return CommandResult(op="status", node_id=node_id, status=status)


TRUE = parse_payload({"argv": ["true"]})


def _task(task_id: str = "t1", **kw: Any) -> Task:
    return Task(id=task_id, type="exec", payload={"argv": ["true"]}, **kw)


def _start(runner: BatchRunner, attempt: int) -> asyncio.Task[tuple[TaskResult, str | None]]:
    return asyncio.create_task(runner.run(_task(), TRUE, attempt, resumed=False))


async def _step(fleet: FakeFleet, cond: Any) -> None:
    await until(cond, within=5, step=0.005)


async def test_runner_creates_watches_collects_and_removes() -> None:
    fleet = FakeFleet()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    run = asyncio.create_task(
        runner.run(_task(), parse_payload({"argv": ["true"]}), 1, resumed=False)
    )
    await _step(fleet, lambda: fleet.created == ["exec-t1-1"])
    fleet.place("exec-t1-1", "n1")
    fleet.states["exec-t1-1"] = AgentState.RUNNING
    fleet.states["exec-t1-1"] = AgentState.EXITED
    result, node_id = await asyncio.wait_for(run, 5)
    assert result.outcome is TaskOutcome.SUCCEEDED and node_id == "n1"
    assert result.result["stdout"] == ["out"] and result.result["duration"] == 2.5
    assert fleet.removed == ["exec-t1-1"]


async def test_runner_resumed_finds_the_same_one_shot_and_never_creates_another() -> None:
    fleet = FakeFleet()
    await fleet.create(one_shot(parse_payload({"argv": ["true"]}), "exec-t1-1"), "op")
    fleet.created.clear()
    fleet.place("exec-t1-1", "n1")
    fleet.states["exec-t1-1"] = AgentState.EXITED
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    result, _ = await runner.run(_task(), parse_payload({"argv": ["true"]}), 1, resumed=True)
    assert result.outcome is TaskOutcome.SUCCEEDED and fleet.created == []


async def test_runner_resumed_but_vanished_counts_the_attempt_without_running() -> None:
    fleet = FakeFleet()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    result, _ = await runner.run(_task(), parse_payload({"argv": ["true"]}), 1, resumed=True)
    assert result.outcome is TaskOutcome.FAILED and "vanished" in (result.error or "")
    assert fleet.created == []


async def test_runner_moved_by_the_leader_is_a_lost_attempt() -> None:
    fleet = FakeFleet()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    run = asyncio.create_task(
        runner.run(_task(), parse_payload({"argv": ["true"]}), 2, resumed=False)
    )
    await _step(fleet, lambda: fleet.created == ["exec-t1-2"])
    fleet.place("exec-t1-2", "n1", epoch=3)
    fleet.states["exec-t1-2"] = AgentState.RUNNING
    await _step(fleet, lambda: ("n1", 3) in fleet.looked)
    fleet.place("exec-t1-2", "n2", epoch=4)  # its node lost: placed elsewhere
    result, node_id = await asyncio.wait_for(run, 5)
    assert result.outcome is TaskOutcome.FAILED and node_id == "n1"
    assert result.error == "exec-t1-2 was moved off node n1 (node lost, or it failed there)"
    assert "exec-t1-2" in fleet.removed


async def test_runner_with_no_matching_node_hands_the_task_back() -> None:
    fleet = FakeFleet()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005, place_wait=0.05))
    run = asyncio.create_task(
        runner.run(_task(), parse_payload({"argv": ["true"]}), 1, resumed=False)
    )
    await _step(fleet, lambda: fleet.created == ["exec-t1-1"])
    fleet.place("exec-t1-1", None, reason="no node has label zone=b")
    result, _ = await asyncio.wait_for(run, 5)
    assert result.outcome is TaskOutcome.RETRY
    assert result.error == "no node can run it yet: no node has label zone=b"
    assert fleet.removed == ["exec-t1-1"]


async def test_runner_after_a_hand_back_waits_out_the_removal_then_runs() -> None:
    fleet = FakeFleet()
    await fleet.create(one_shot(TRUE, "exec-t1-1"), "op")
    fleet.records["exec-t1-1"] = msgspec.structs.replace(fleet.records["exec-t1-1"], deleting=True)
    fleet.created.clear()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    run = _start(runner, 1)
    await _step(fleet, lambda: fleet.created == ["exec-t1-1"])
    fleet.place("exec-t1-1", "n1")
    fleet.states["exec-t1-1"] = AgentState.EXITED
    result, _ = await asyncio.wait_for(run, 5)
    assert result.outcome is TaskOutcome.SUCCEEDED


async def test_sweep_removes_only_one_shots_long_past_their_timeout() -> None:
    fleet = FakeFleet()
    now = utc_now()
    await fleet.create(one_shot(TRUE, "exec-old-1", "old", now - timedelta(seconds=200)), "op")
    await fleet.create(one_shot(TRUE, "exec-late-1", "late", now - timedelta(seconds=5)), "op")
    await fleet.create(one_shot(TRUE, "exec-new-1", "new", now + timedelta(seconds=60)), "op")
    runner = BatchRunner(fleet, ExecSettings(sweep_grace=120))
    fleet.leader = False
    assert await runner.sweep() == []  # only the leader sweeps
    fleet.leader = True
    assert await runner.sweep() == ["exec-old-1"]
    assert sorted(fleet.records) == ["exec-late-1", "exec-new-1"]
    labels = fleet.records["exec-new-1"].deployment.spec.labels
    assert labels["fabric.exec/task"] == "new"


def test_controller_fleet_forgets_statuses_of_gone_one_shots() -> None:
    status = _status(AgentState.EXITED, exit_code=0)
    kept = DeploymentRecord(deployment=one_shot(TRUE, "exec-b-1"))
    controller = SimpleNamespace(
        deployments=SimpleNamespace(items={"exec-b-1": (kept, 1)}),
        statuses={"exec-a-1": {"n1": status}, "exec-b-1": {"n1": status}, "web": {"n1": status}},
    )
    assert ControllerFleet(controller).forget_gone() == 1
    assert sorted(controller.statuses) == ["exec-b-1", "web"]  # others' agents untouched


async def test_runner_removes_a_leftover_of_the_previous_attempt_first() -> None:
    fleet = FakeFleet()
    await fleet.create(one_shot(parse_payload({"argv": ["true"]}), "exec-t1-1"), "op")
    fleet.place("exec-t1-1", "n1")
    fleet.states["exec-t1-1"] = AgentState.RUNNING
    fleet.created.clear()
    runner = BatchRunner(fleet, ExecSettings(poll=0.005))
    run = asyncio.create_task(
        runner.run(_task(), parse_payload({"argv": ["true"]}), 2, resumed=False)
    )
    await _step(fleet, lambda: fleet.created == ["exec-t1-2"])
    assert fleet.removed == ["exec-t1-1"]  # before the new one was created
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)


# --- real controller and nodes ---------------------------------------------------


@dataclass
class Stack:
    rig: TaskRig
    fleet: Fleet
    ctl: Controller
    run: asyncio.Task[None]
    """The controller's run: a test may cancel it to stop the controller."""


@pytest.fixture
async def stack(pki: FabricPki, tmp_path: Path) -> AsyncIterator[Stack]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = TaskRig(pki, server, tmp_path, Clients(pki, default_urls=server.url))
    fleet = Fleet(pki, server, tmp_path)
    ctl = await _controller(rig, pki, "ctl-1")
    run = asyncio.create_task(ctl.run())
    try:
        async with asyncio.timeout(10):
            await ctl.started.wait()
        fleet.start("n1", zone="a")
        fleet.start("n2", zone="b")
        await until(lambda: _ready(ctl, "n1", "n2"), within=20)
        yield Stack(rig, fleet, ctl, run)
        await fleet.stop_all()
    finally:
        try:
            await stop_run(run)
        finally:
            await fleet.stop_all()
            await rig.aclose()
            await server.stop()


async def _controller(rig: TaskRig, pki: FabricPki, name: str) -> Controller:
    # Node loss is not what these tests are about: a loaded machine's late
    # heartbeat must not move a one-shot.
    config = controller_config(pki, name, node_timeout=5.0)
    ctl = Controller(await rig.clients("ctl-1"), config)
    ctl.task_settings = fast_settings(ack_wait=3.0)  # type: ignore[attr-defined]
    ctl.exec_settings = ExecSettings(  # type: ignore[attr-defined]
        place_wait=5.0, gone_wait=15.0, sweep_every=0.5, sweep_grace=1.0
    )
    return ctl


def _ready(ctl: Controller, *nodes: str) -> bool:
    now = asyncio.get_running_loop().time()
    return all(n in ctl.live and now - ctl.live[n].last_seen < 1.0 for n in nodes)


def _deployed(ctl: Controller) -> list[str]:
    mirror = ctl.deployments
    return sorted(mirror.items) if mirror is not None else []


def _procs(marker: str) -> list[int]:
    """Live processes whose command line carries ``marker``."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if any(marker in part for part in cmdline) and proc.info["status"] != "zombie":
            out.append(proc.pid)
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_exec_runs_once_on_the_matching_node_and_stores_its_result(
    stack: Stack,
) -> None:
    rig, ctl = stack.rig, stack.ctl
    tasks = await rig.tasks()
    code = "import sys; print('hello'); print('line two'); print('warn', file=sys.stderr)"
    payload = {"argv": [PY, "-c", code], "constraints": {"labels": {"zone": "b"}}}
    submitted = await tasks.submit("exec", payload, task_id="job-ok")
    record = await tasks.wait("job-ok", within=30)

    assert record.state is TaskState.SUCCEEDED, record.error
    assert (record.attempts, record.agent_id, record.node_id) == (1, "exec-job-ok-1", "n2")
    result = record.result
    assert result["exit_code"] == 0 and result["signal"] is None
    assert result["stdout"] == ["hello", "line two"] and result["stderr"] == ["warn"]
    assert result["node_id"] == "n2" and result["agent_id"] == "exec-job-ok-1"
    assert 0 <= result["duration"] < 30
    assert submitted.task.type == "exec"
    # The one-shot is removed from the registry and from its node.
    await until(lambda: "exec-job-ok-1" not in _deployed(ctl), within=15)
    await until(
        lambda: all("exec-job-ok-1" not in live.agents for live in ctl.live.values()), within=15
    )


async def test_nonzero_exit_is_a_failed_attempt_retried_then_dead(
    stack: Stack, tmp_path: Path
) -> None:
    rig, ctl = stack.rig, stack.ctl
    tasks = await rig.tasks()
    runs = tmp_path / "runs"
    code = (
        "import sys; open(sys.argv[1], 'a').write('ran\\n');"
        " print('bad input', file=sys.stderr); sys.exit(3)"
    )
    payload = {"argv": [PY, "-c", code, str(runs)]}
    await tasks.submit("exec", payload, task_id="job-fail", max_attempts=2)
    record = await tasks.wait("job-fail", within=40)

    assert record.state is TaskState.DEAD and record.attempts == 2
    assert record.error is not None and record.error.startswith("exit code 3")
    assert "bad input" in record.error
    assert _lines(runs) == ["ran", "ran"]  # each attempt ran once, its own one-shot
    js = tasks.nc.jetstream()
    letter = decode((await js.get_last_msg(DEAD_STREAM, "tasks.exec.dead")).data, DeadTask)
    assert letter.task.id == "job-fail" and letter.error == record.error
    await until(lambda: not [d for d in _deployed(ctl) if d.startswith("exec-job-fail")], 15)


@pytest.mark.parametrize(
    "payload",
    [{"argv": []}, {"argv": "echo hi"}, {"argv": ["echo"], "shell": True}, "echo hi"],
)
async def test_bad_payload_is_dead_with_a_code_and_never_runs(stack: Stack, payload: Any) -> None:
    rig, ctl = stack.rig, stack.ctl
    tasks = await rig.tasks()
    await tasks.submit("exec", payload, task_id="job-bad")
    record = await tasks.wait("job-bad", within=20)

    assert record.state is TaskState.DEAD and record.attempts == 0
    assert record.error is not None and record.error.startswith("invalid_payload: ")
    assert record.agent_id is None and record.started_at is None
    assert not [d for d in _deployed(ctl) if d.startswith("exec-")]


async def test_no_matching_node_waits_without_using_attempts_then_runs_when_one_is_back(
    stack: Stack,
) -> None:
    rig, ctl = stack.rig, stack.ctl
    tasks = await rig.tasks()
    # The only zone-b node leaves (a clean shutdown) ...
    n2 = stack.fleet.procs["n2"]
    n2.terminate()
    await until(lambda: n2.poll() is not None, within=20)
    # Lost, not just quiet: a node still within its timeout is placed on.
    await until(lambda: ctl.node_states.get("n2") is NodeState.LOST, within=20)
    payload = {"argv": ["echo", "found"], "constraints": {"labels": {"zone": "b"}}}
    await tasks.submit("exec", payload, task_id="job-wait", max_attempts=1)
    seen = await rig.record_until(
        tasks.nc, "job-wait", lambda r: r.waiting.startswith("no node can run it yet"), 30
    )
    assert seen[-1].state is TaskState.QUEUED and seen[-1].attempts == 0

    # ... and comes back: the task runs there, its attempt budget untouched.
    stack.fleet.start("n2", zone="b")
    record = await tasks.wait("job-wait", within=60)
    assert record.state is TaskState.SUCCEEDED, record.error
    assert (record.attempts, record.node_id) == (1, "n2")
    assert record.result["stdout"] == ["found"]


async def test_timeout_stops_it_and_fails_the_attempt(stack: Stack, tmp_path: Path) -> None:
    rig = stack.rig
    tasks = await rig.tasks()
    marker = str(tmp_path / "timeout-marker")
    code = "import sys, time; print('started', flush=True); time.sleep(120)"
    payload = {"argv": [PY, "-c", code, marker], "timeout": 2, "stop_timeout": 1}
    await tasks.submit("exec", payload, task_id="job-slow", max_attempts=1)
    record = await tasks.wait("job-slow", within=40)

    assert record.state is TaskState.DEAD and record.attempts == 1
    assert record.error is not None and record.error.startswith("timeout: still running after 2")
    assert not _procs(marker)


async def test_a_controller_stopping_mid_exec_hands_the_same_one_shot_to_the_next(
    stack: Stack, pki: FabricPki, tmp_path: Path
) -> None:
    """The first controller stops (cancelled: no ack, no nak, no cleanup, as in a
    crash) while the one-shot runs; the next one takes the redelivered task,
    finds the same one-shot by name and collects its result. Never two copies."""
    rig = stack.rig
    tasks = await rig.tasks()
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    code = (
        "import os, sys, time\n"
        "open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
        "print('finished')\n"
    )
    payload = {"argv": [PY, "-c", code, str(pids), str(gate)]}
    await tasks.submit("exec", payload, task_id="job-handover")
    await until(lambda: len(_lines(pids)) == 1, within=30)
    pid = int(_lines(pids)[0])

    await stop_run(stack.run)
    assert psutil.pid_exists(pid)

    second = await _controller(rig, pki, "ctl-2")
    async with running(second):
        # Taken over after the ack wait: the record names the new dispatcher.
        await rig.record_until(tasks.nc, "job-handover", lambda r: r.dispatcher == "ctl-2", 60)
        assert [int(x) for x in _lines(pids)] == [pid] and psutil.pid_exists(pid)
        gate.touch()
        record = await tasks.wait("job-handover", within=60)
        assert record.state is TaskState.SUCCEEDED and record.attempts == 1
        assert record.result["stdout"] == ["finished"] and record.agent_id == "exec-job-handover-1"
        assert [int(x) for x in _lines(pids)] == [pid]  # it ran once
        await until(lambda: "exec-job-handover-1" not in _deployed(second), within=15)


async def test_an_unwatched_one_shot_is_removed_once_past_its_timeout(
    stack: Stack, pki: FabricPki, tmp_path: Path
) -> None:
    """Its controller stops and its task's message is gone (no redelivery will
    bring a dispatcher back): the next leader's sweep still stops it."""
    rig = stack.rig
    tasks = await rig.tasks()
    pids = tmp_path / "pids"
    code = (
        "import os, sys, time\nopen(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\ntime.sleep(600)\n"
    )
    payload = {"argv": [PY, "-c", code, str(pids)], "timeout": 2}
    await tasks.submit("exec", payload, task_id="job-orphan")
    await until(lambda: len(_lines(pids)) == 1, within=30)
    pid = int(_lines(pids)[0])
    await stop_run(stack.run)
    await tasks.nc.jetstream().purge_stream(TASKS_STREAM)

    second = await _controller(rig, pki, "ctl-2")
    async with running(second):
        await until(lambda: not psutil.pid_exists(pid), within=30)
        await until(lambda: "exec-job-orphan-1" not in _deployed(second), within=15)
    assert _lines(pids) == [str(pid)]


async def test_cli_submit_exec_wait(stack: Stack) -> None:
    rig = stack.rig
    op = rig.pki["op-1"]
    env = {
        **os.environ,
        "FABRIC_NATS_URL": rig.server.url,
        "FABRIC_CA": str(rig.pki.ca),
        "FABRIC_CERT": str(op.cert),
        "FABRIC_KEY": str(op.key),
        "FABRIC_TOKEN_KEY": str(rig.pki.dir / "signing.key"),
        "PYTHONPATH": str(ROOT),
    }
    data = json.dumps({"argv": ["echo", "hi"]})
    args = ["task", "submit", "exec", "--data", data, "--id", "cli-exec", "--wait"]
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "fabric", *args, "--timeout", "30",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "submitted cli-exec (exec, queue position 1)"
    result = json.loads("\n".join(lines[1:]))
    assert result["exit_code"] == 0 and result["stdout"] == ["hi"]


# A whole controller in its own process (to be SIGKILLed), with this module's
# test timings: what `fabric controller run` does, plus a short ack wait.
CONTROLLER = """
import asyncio, sys
from pathlib import Path
from fabric.connect import connect
from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.tasks.dispatch import DispatchSettings
from fabric.tasks.stream import QueueSettings

async def main(name, pki):
    config = ControllerConfig(
        name=name,
        signing_key=pki / "signing.key",
        verify_keys=(pki / "signing.pub",),
        node_timeout=5.0,
        reconcile_interval=0.1,
        lease_ttl=1.0,
        streams=StreamSettings(lease_ttl=1.0),
    )
    ctl = Controller(await connect(name=name), config)
    ctl.task_settings = DispatchSettings(queue=QueueSettings(ack_wait=3.0))
    run = asyncio.create_task(ctl.run())
    await ctl.started.wait()
    print("ready", flush=True)
    await run

asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
"""


async def test_kill_9_of_the_controller_mid_exec_leaves_one_run_collected_by_the_next(
    pki: FabricPki, tmp_path: Path
) -> None:
    """A controller process running an exec task is SIGKILLed mid-run; the next
    controller takes the redelivered task, finds the one-shot by its name and
    collects its result. One process ran, once; nothing is left behind."""
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = TaskRig(pki, server, tmp_path, Clients(pki, default_urls=server.url))
    fleet = Fleet(pki, server, tmp_path)
    try:
        env = {**rig.env("ctl-1"), "PYTHONPATH": str(ROOT)}
        argv = [PY, "-c", CONTROLLER, "ctl-a", str(pki.dir)]
        doomed = rig.spawn("ctl-a", argv, env)
        await rig.started("ctl-a")
        fleet.start("n1")
        tasks = await rig.tasks()
        pids, gate = tmp_path / "pids", tmp_path / "gate"
        code = (
            "import os, sys, time\n"
            "open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
            "print('finished')\n"
        )
        payload = {"argv": [PY, "-c", code, str(pids), str(gate)]}
        await tasks.submit("exec", payload, task_id="job-k9")
        await until(lambda: len(_lines(pids)) == 1, within=30)
        pid = int(_lines(pids)[0])
        doomed.kill()
        doomed.wait(timeout=10)

        second = await _controller(rig, pki, "ctl-b")
        async with running(second):
            await rig.record_until(tasks.nc, "job-k9", lambda r: r.dispatcher == "ctl-b", 60)
            assert [int(x) for x in _lines(pids)] == [pid] and psutil.pid_exists(pid)
            gate.touch()
            record = await tasks.wait("job-k9", within=60)
            assert record.state is TaskState.SUCCEEDED and record.attempts == 1
            assert record.result["stdout"] == ["finished"] and record.node_id == "n1"
            assert [int(x) for x in _lines(pids)] == [pid]
            await until(lambda: "exec-job-k9-1" not in _deployed(second), within=15)
            await until(lambda: not psutil.pid_exists(pid), within=15)
            await fleet.stop_all()
    finally:
        await fleet.stop_all()
        await rig.aclose()
        await server.stop()
