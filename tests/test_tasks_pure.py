"""The task queue's pure parts: the agent chooser, retry delays, the record
state machine and the checks a task passes before it is sent."""

from __future__ import annotations

import asyncio
from datetime import datetime
from types import SimpleNamespace

import pytest

from fabric.tasks.agents import Candidate, choose_agent, controller_agents, retry_delay
from fabric.tasks.client import make_task, new_task_id
from fabric.tasks.records import (
    TaskState,
    after_failure,
    handed_back,
    new_record,
    started,
    succeeded,
    transition,
    waiting,
    went_dead,
)
from schemas.agent import AgentSpec, AgentState, AgentStatus, HealthVerdict
from schemas.api import Deployment, DeploymentRecord, ReplicaPlacement
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.ids import is_valid_id
from schemas.node import AgentSummary
from schemas.task import MAX_TASK_PAYLOAD_BYTES, TaskOutcome, TaskResult


def cand(agent_id: str, *types: str, healthy: bool = True) -> Candidate:
    return Candidate(agent_id, "n1", frozenset(types), healthy)


VIEW = {
    "b": cand("b", "echo"),
    "a": cand("a", "echo", "resize"),
    "c": cand("c", "resize"),
    "sick": cand("sick", "echo", healthy=False),
}


@pytest.mark.parametrize(
    ("task_type", "inflight", "limit", "expected"),
    [
        ("echo", {}, None, "a"),  # ties go by id
        ("echo", {"a": 1}, None, "b"),  # fewest in flight first
        ("echo", {"a": 2, "b": 2}, None, "a"),
        ("resize", {"a": 3, "c": 1}, None, "c"),
        ("echo", {"a": 2, "b": 2}, 2, None),  # both at their limit
        ("echo", {"a": 2, "b": 1}, 2, "b"),
        ("convert", {}, None, None),  # nobody serves it
    ],
)
def test_choose_agent(
    task_type: str, inflight: dict[str, int], limit: int | None, expected: str | None
) -> None:
    assert choose_agent(task_type, VIEW, inflight, limit=limit) == expected


def test_choose_agent_skips_unhealthy_and_empty_views() -> None:
    assert choose_agent("echo", {"sick": VIEW["sick"]}, {}) is None
    assert choose_agent("echo", {}, {}) is None


def test_retry_delay_doubles_up_to_its_cap() -> None:
    assert [retry_delay(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def task_result(outcome: TaskOutcome, attempt: int = 1) -> TaskResult:
    now = utc_now()
    return TaskResult(
        task_id="t1", agent_id="a", attempt=attempt, outcome=outcome, result={"ok": 1},
        started_at=now, finished_at=now,
    )  # fmt: skip


def test_record_lifecycle_to_success() -> None:
    task, _ = make_task("echo", {"x": 1}, task_id="t1", submitted_by="op-1")
    record = new_record(task, "ctl-1")
    assert (record.state, record.attempts, record.submitted_by) == (TaskState.QUEUED, 0, "op-1")
    record = started(record, "a", "n1", "ctl-1")
    assert (record.state, record.agent_id, record.node_id) == (TaskState.RUNNING, "a", "n1")
    record = succeeded(record, task_result(TaskOutcome.SUCCEEDED))
    assert record.final and record.result == {"ok": 1} and record.attempts == 1
    with pytest.raises(ContractError) as caught:
        started(record, "b", "n2", "ctl-1")
    assert caught.value.code is ErrorCode.INVALID_STATE


def test_failures_count_until_max_attempts() -> None:
    task, _ = make_task("echo", task_id="t1", max_attempts=2)
    record = started(new_record(task), "a", "n1", "ctl-1")
    record, spent = after_failure(record, 1, "boom")
    assert (record.state, record.attempts, spent) == (TaskState.FAILED, 1, False)
    record = waiting(record, "no running agent serves 'echo'")
    assert record.state is TaskState.FAILED, "still failed while it waits"
    record = started(record, "a", "n1", "ctl-1")
    record, spent = after_failure(record, 2, "boom again")
    assert spent and record.error == "boom again"
    record = went_dead(record, "boom again")
    assert record.final and record.state is TaskState.DEAD
    with pytest.raises(ContractError):
        transition(record, TaskState.QUEUED)


def test_handing_back_uses_no_attempt() -> None:
    task, _ = make_task("echo", task_id="t1")
    record = started(new_record(task), "a", "n1", "ctl-1")
    record = handed_back(record, "worker draining")
    assert (record.state, record.attempts, record.waiting) == (
        TaskState.QUEUED,
        0,
        "worker draining",
    )


def test_new_task_ids_are_valid_and_distinct() -> None:
    ids = {new_task_id() for _ in range(100)}
    assert len(ids) == 100 and all(is_valid_id(i) for i in ids)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"task_type": "echo", "task_id": "Bad Id"}, ErrorCode.INVALID_ID),
        ({"task_type": "echo", "task_id": "a" * 64}, ErrorCode.INVALID_ID),
        ({"task_type": "echo.queue"}, ErrorCode.INVALID_ID),
        ({"task_type": "*"}, ErrorCode.INVALID_ID),
        ({"task_type": "echo", "priority": 10}, ErrorCode.INVALID_PAYLOAD),
        ({"task_type": "echo", "max_attempts": 0}, ErrorCode.INVALID_PAYLOAD),
        ({"task_type": "echo", "payload": object()}, ErrorCode.INVALID_PAYLOAD),
        ({"task_type": "echo", "deadline": datetime(2030, 1, 1)}, ErrorCode.INVALID_PAYLOAD),
        (
            {"task_type": "echo", "payload": "x" * MAX_TASK_PAYLOAD_BYTES},
            ErrorCode.PAYLOAD_TOO_LARGE,
        ),
    ],
)
def test_bad_tasks_are_refused_with_their_code(kwargs: dict[str, object], code: ErrorCode) -> None:
    with pytest.raises(ContractError) as caught:
        make_task(**kwargs)  # type: ignore[arg-type]
    assert caught.value.code is code


def test_a_task_just_under_the_limit_is_accepted() -> None:
    task, data = make_task("echo", "x" * (MAX_TASK_PAYLOAD_BYTES - 400))
    assert len(data) <= MAX_TASK_PAYLOAD_BYTES and task.type == "echo"


async def test_controller_view_keeps_running_agents_that_declare_capabilities() -> None:
    now = asyncio.get_running_loop().time()

    def record(name: str, caps: list[str], placed: dict[str, str]) -> DeploymentRecord:
        spec = AgentSpec(name=name, argv=["true"], capabilities=caps)
        replicas = [ReplicaPlacement(agent_id=a, node_id=n) for a, n in placed.items()]
        return DeploymentRecord(deployment=Deployment(spec=spec), replicas=replicas)

    def status(agent_id: str, node_id: str, state: str, health: str = "unknown") -> AgentStatus:
        return AgentStatus(
            agent_id=agent_id, node_id=node_id, state=AgentState(state), since=utc_now(),
            health=HealthVerdict(health),
        )  # fmt: skip

    deployments = {
        "w": record("w", ["echo"], {"w-0": "n1", "w-1": "n1", "w-2": "n2", "w-3": "n1"}),
        "plain": record("plain", [], {"plain": "n1"}),
    }
    controller = SimpleNamespace(
        deployments=SimpleNamespace(items={k: (v, 1) for k, v in deployments.items()}),
        config=SimpleNamespace(node_timeout=1.5),
        live={
            "n1": SimpleNamespace(
                last_seen=now,
                agents={"w-0": AgentSummary("w-0", AgentState.RUNNING)},
            ),
            "n2": SimpleNamespace(last_seen=now - 10, agents={}),  # heartbeat too old
        },
        statuses={
            "w-1": {"n1": status("w-1", "n1", "exited")},
            "w-3": {"n1": status("w-3", "n1", "running", "unhealthy")},
            "plain": {"n1": status("plain", "n1", "running")},
        },
    )

    view = controller_agents(controller)

    assert sorted(view) == ["w-0", "w-3"]
    assert view["w-0"] == Candidate("w-0", "n1", frozenset({"echo"}), True)
    assert not view["w-3"].healthy, "kept (its running task is not lost) but never chosen"
    assert choose_agent("echo", view, {}) == "w-0"
