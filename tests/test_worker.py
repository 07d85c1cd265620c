"""The worker SDK against a real server: assignments sent by request as a
controller would, replies checked, concurrency, progress and the drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import pytest
from natsfixtures import Clients
from workers.rig import Events

from fabric.permissions import permissions_for
from fabric.tasks.client import TaskClient, make_task
from fabric.worker import TaskContext, Worker
from schemas import subjects
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.task import Task, TaskAssignment, TaskOutcome, TaskResult

pytestmark = pytest.mark.usefixtures("nats_server")


@dataclass
class Probe:
    """What the test handler saw: handlers running now, the most at once; a gate."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    peak: int = 0

    async def until_active(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.active < count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # wait-ok: polling the handler count under a deadline


@pytest.fixture
async def started(connect_as: Clients) -> AsyncIterator[tuple[Worker, Any, Probe]]:
    """A worker ``w1`` (identity work-1), a controller client, the handler's probe."""
    nc = await connect_as("work-1")
    worker = Worker("w1", nc=nc, grace=0.3)
    probe = Probe()

    @worker.task("echo", concurrency=2)
    async def echo(ctx: TaskContext, payload: Any) -> Any:
        probe.active += 1
        probe.peak = max(probe.peak, probe.active)
        try:
            if payload == "block":
                await probe.gate.wait()
            if payload == "progress":
                await ctx.progress(0.5, "half")
            if payload == "raise":
                raise ValueError("bad input")
            if payload == "unencodable":
                return object()
            return {"got": payload, "attempt": ctx.attempt}
        finally:
            probe.active -= 1

    runner = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 5)
    try:
        yield worker, await connect_as("ctl-1"), probe
    finally:
        worker.stop()
        probe.gate.set()
        await asyncio.wait_for(runner, 10)


def assignment(payload: Any, task_type: str = "echo", task_id: str = "t1") -> bytes:
    task = Task(id=task_id, type=task_type, payload=payload, submitted_at=utc_now())
    return encode(TaskAssignment(task=task, attempt=1, ack_wait=3.0))


async def send(ctl: Any, body: bytes, within: float = 5) -> TaskResult:
    reply = await ctl.request(subjects.agent_tasks("w1"), body, timeout=within)
    return decode(reply.data, TaskResult)


async def test_results_and_failures(started: tuple[Worker, Any, Probe]) -> None:
    _, ctl, _ = started
    ok = await send(ctl, assignment({"a": 1}))
    assert (ok.outcome, ok.result, ok.agent_id) == (
        TaskOutcome.SUCCEEDED,
        {"got": {"a": 1}, "attempt": 1},
        "w1",
    )
    raised = await send(ctl, assignment("raise", task_id="t2"))
    assert (raised.outcome, raised.error) == (TaskOutcome.FAILED, "ValueError: bad input")
    unknown = await send(ctl, assignment(1, task_type="resize", task_id="t3"))
    assert unknown.outcome is TaskOutcome.FAILED and "no 'resize'" in (unknown.error or "")
    odd = await send(ctl, assignment("unencodable", task_id="t4"))
    assert odd.outcome is TaskOutcome.FAILED and "not JSON-encodable" in (odd.error or "")


async def test_a_bad_assignment_gets_an_error_reply(started: tuple[Worker, Any, Probe]) -> None:
    _, ctl, _ = started
    reply = await ctl.request(subjects.agent_tasks("w1"), b'{"task": 1}', timeout=5)
    refusal = decode(reply.data, ErrorReply)
    assert refusal.code is ErrorCode.INVALID_PAYLOAD


async def test_concurrency_is_capped_per_handler(started: tuple[Worker, Any, Probe]) -> None:
    _, ctl, probe = started
    sends = [asyncio.create_task(send(ctl, assignment("block", task_id=f"c{i}"))) for i in range(4)]
    await probe.until_active(2)
    probe.gate.set()
    results = await asyncio.gather(*sends)
    assert all(r.outcome is TaskOutcome.SUCCEEDED for r in results)
    assert probe.peak == 2


async def test_progress_is_published_as_an_event(
    started: tuple[Worker, Any, Probe], connect_as: Clients
) -> None:
    _, ctl, _ = started
    op = await connect_as("op-1")
    events = Events()
    await op.subscribe("events.task.progress", cb=events.on_msg)
    await op.flush()
    await send(ctl, assignment("progress", task_id="p1"))
    event = await events.wait_for(lambda e: e["data"]["message"] == "half")
    assert event["type"] == "io.agent-fabric.task.progress" and event["subject"] == "p1"
    assert (event["data"]["agent_id"], event["data"]["fraction"]) == ("w1", 0.5)


async def test_drain_finishes_or_hands_back(started: tuple[Worker, Any, Probe]) -> None:
    worker, ctl, probe = started
    # Two run (concurrency 2) and block past the 0.3 s grace; a third waits for a slot.
    sends = [asyncio.create_task(send(ctl, assignment("block", task_id=f"d{i}"))) for i in range(3)]
    await probe.until_active(2)
    worker.stop()
    results = await asyncio.gather(*sends)

    assert [r.outcome for r in results] == [TaskOutcome.RETRY] * 3
    assert worker.counts == {"succeeded": 0, "failed": 0, "handed_back": 3}
    with pytest.raises(nats.errors.NoRespondersError):
        await send(ctl, assignment(1, task_id="late"), within=1)


def test_the_agent_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_AGENT_ID", "summarizer-3")
    assert Worker().agent_id == "summarizer-3"
    monkeypatch.delenv("FABRIC_AGENT_ID")
    with pytest.raises(RuntimeError, match="FABRIC_AGENT_ID"):
        Worker()
    with pytest.raises(ContractError) as caught:
        Worker("Not An Id")
    assert caught.value.code is ErrorCode.INVALID_ID


def test_handlers_are_declared_once_with_a_valid_type() -> None:
    worker = Worker("w1")

    @worker.task("echo")
    async def echo(ctx: TaskContext, payload: Any) -> Any:
        return payload

    with pytest.raises(ValueError, match="already registered"):
        worker.task("echo")(echo)
    with pytest.raises(ContractError):
        worker.task("no.dots")
    with pytest.raises(ValueError, match="concurrency"):
        worker.task("other", concurrency=0)
    assert worker.task_types == ["echo"]


DIRECT_ALLOWED = permissions_for("worker", "work-1").may_subscribe(
    "tasks.*.direct"
) and permissions_for("operator", "op-1").may_publish("tasks.*.direct")


@pytest.mark.skipif(
    not DIRECT_ALLOWED,
    reason="needs worker subscribe and operator publish on tasks.*.direct (fabric/permissions.py)",
)
async def test_direct_tasks_go_to_one_worker_of_the_queue_group(connect_as: Clients) -> None:
    seen: list[tuple[str, Any]] = []
    workers = []
    for name in ("d1", "d2"):
        worker = Worker(name, nc=await connect_as("work-1"))

        @worker.task("ping", direct=True)
        async def ping(ctx: TaskContext, payload: Any, name: str = name) -> Any:
            seen.append((name, payload))
            return payload

        workers.append((worker, asyncio.create_task(worker.run())))
        await asyncio.wait_for(worker.ready.wait(), 5)
    tasks = TaskClient(await connect_as("op-1"), submitted_by="op-1")
    try:
        for i in range(20):
            await tasks.send_direct("ping", i)
        _, data = make_task("ping", "asked")
        reply = await tasks.nc.request("tasks.ping.direct", data, timeout=5)
        assert decode(reply.data, TaskResult).result == "asked"
    finally:
        for worker, runner in workers:
            worker.stop()
            await asyncio.wait_for(runner, 10)
    assert sorted(p for _, p in seen if p != "asked") == list(range(20)), "each one exactly once"
