"""Tasks end to end on a real nats-server with real worker processes.

A dispatcher runs in the test's loop over a view the test controls (the
registry's part; tests/test_tasks_fleet.py runs the real controller and
node). Workers are tests/workers/ledger.py processes started with the env a
node gives its agents; their ledger file says how often each task ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agents.harness import until
from natsfixtures import FabricPki
from workers.rig import TaskRig, fast_settings, task_rig

from fabric.tasks.client import TaskClient, make_task
from fabric.tasks.records import DeadTask, TaskState
from fabric.tasks.stream import DEAD_STREAM, QueueSettings
from fabric.tokens import TokenIssuer
from schemas.codec import decode


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    # One server per test: each starts with an empty queue and no records.
    async with task_rig(pki, tmp_path) as rig:
        yield rig


async def test_submit_runs_and_stores_the_result(rig: TaskRig) -> None:
    await rig.dispatcher()
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()
    events = await rig.subscribe_events(tasks.nc, "events.task.>")

    submitted = await tasks.submit("echo", {"n": 1})
    assert not submitted.duplicate
    record = await tasks.wait(submitted.task.id, within=10)

    assert record.state is TaskState.SUCCEEDED
    assert record.result == {"echo": {"n": 1}, "agent": "wa"}
    assert (record.attempts, record.agent_id, record.node_id) == (1, "wa", "n1")
    assert record.submitted_by == "op-1"
    assert record.started_at is not None and record.finished_at is not None
    assert await tasks.get(submitted.task.id) == record
    done = await events.wait_for(lambda e: e["type"] == "io.agent-fabric.task.completed")
    assert done["subject"] == submitted.task.id and done["actor"] == "op-1"
    await rig.queue_drained()  # acked: gone from the work queue


async def test_same_id_twice_runs_once(rig: TaskRig) -> None:
    await rig.dispatcher()
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()

    first = await tasks.submit("echo", {"n": 1}, task_id="dup-1")
    second = await tasks.submit("echo", {"n": 2}, task_id="dup-1")
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.sequence == first.sequence
    record = await tasks.wait("dup-1", within=10)
    # Once more after it finished (and left the work queue): still nothing new.
    third = await tasks.submit("echo", {"n": 3}, task_id="dup-1")

    assert third.duplicate
    assert record.result["echo"] == {"n": 1}
    assert [e["task"] for e in rig.entries("start")] == ["dup-1"]


async def test_worker_killed_mid_task_completes_on_another(rig: TaskRig) -> None:
    await rig.dispatcher()
    await rig.worker("wa", "echo")
    await rig.worker("wb", "echo")
    tasks = await rig.tasks()
    progress = await rig.subscribe_events(tasks.nc, "events.task.progress")

    submitted = await tasks.submit("echo", {"sleep": 1.5})
    # Ties go by id: "wa" gets it. Kill it once it has started.
    await progress.wait_for(lambda e: e["data"]["agent_id"] == "wa")
    rig.kill("wa")
    record = await tasks.wait(submitted.task.id, within=20)

    assert record.state is TaskState.SUCCEEDED
    assert (record.agent_id, record.attempts) == ("wb", 2)
    starts = [(e["agent"], e["attempt"]) for e in rig.entries("start")]
    assert starts == [("wa", 1), ("wb", 2)]
    assert [e["agent"] for e in rig.entries("done")] == ["wb"]


async def test_failing_handler_is_retried_then_dead_lettered(rig: TaskRig) -> None:
    await rig.dispatcher()
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()
    events = await rig.subscribe_events(tasks.nc, "events.task.>")

    submitted = await tasks.submit("echo", {"fail": "boom"}, max_attempts=3)
    record = await tasks.wait(submitted.task.id, within=15)

    assert record.state is TaskState.DEAD
    assert record.attempts == 3
    assert record.error == "RuntimeError: boom"
    assert len(rig.entries("start")) == 3
    await events.wait_for(lambda e: e["type"] == "io.agent-fabric.task.dead")
    kinds = [e["type"].rsplit(".", 1)[-1] for e in events.items if e["subject"] == record.id]
    assert [k for k in kinds if k != "progress"] == ["failed", "failed", "dead"]
    ctl = await rig.clients("ctl-1")
    letter = await ctl.jetstream().get_last_msg(DEAD_STREAM, "tasks.echo.dead")
    assert letter.data is not None
    dead = decode(letter.data, DeadTask)
    assert (dead.task.id, dead.attempts, dead.error) == (record.id, 3, "RuntimeError: boom")
    await rig.queue_drained()  # termed: gone from the work queue


async def test_no_capable_agent_waits_then_runs_when_one_appears(rig: TaskRig) -> None:
    # A long ack wait: the redelivery delays must be the nak delays alone (a
    # consumer BackOff list would stretch them by tens of seconds).
    await rig.dispatcher(fast_settings(ack_wait=20))
    await rig.worker("other", "resize")
    tasks = await rig.tasks()

    submitted = await tasks.submit("echo", {"n": 7})
    seen = await rig.record_until(tasks.nc, submitted.task.id, lambda r: bool(r.waiting))
    assert seen[-1].state is TaskState.QUEUED
    assert seen[-1].waiting == "no running agent serves 'echo'"
    assert seen[-1].attempts == 0, "waiting uses no attempt"
    await rig.worker("wa", "echo")
    record = await tasks.wait(submitted.task.id, within=10)

    assert (record.state, record.agent_id, record.attempts) == (TaskState.SUCCEEDED, "wa", 1)
    assert len(rig.entries("start")) == 1


async def test_progress_keeps_a_task_longer_than_ack_wait(rig: TaskRig) -> None:
    await rig.dispatcher(fast_settings(ack_wait=0.6))
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()

    submitted = await tasks.submit("echo", {"sleep": 2.5, "progress": 0.15})
    seen = await rig.record_until(tasks.nc, submitted.task.id, lambda r: r.final, within=15)

    assert seen[-1].state is TaskState.SUCCEEDED and seen[-1].attempts == 1
    assert any(r.progress_message == "working" for r in seen), "progress reached the record"
    assert len(rig.entries("start")) == 1, "ran once: the deadline never passed"


async def test_sigterm_hands_back_running_work(rig: TaskRig) -> None:
    await rig.dispatcher()
    proc = await rig.worker("wa", "echo", grace=0.2)
    tasks = await rig.tasks()
    progress = await rig.subscribe_events(tasks.nc, "events.task.progress")

    submitted = await tasks.submit("echo", {"sleep": 1.5})
    await progress.wait_for(lambda e: e["data"]["agent_id"] == "wa")
    proc.terminate()
    await rig.worker("wb", "echo")
    record = await tasks.wait(submitted.task.id, within=15)

    assert proc.wait(timeout=10) == 0, "drained and exited cleanly"
    assert (record.state, record.agent_id) == (TaskState.SUCCEEDED, "wb")
    assert record.attempts == 1, "a handed-back task keeps its attempts"
    assert [e["agent"] for e in rig.entries("start")] == ["wa", "wb"]


async def test_junk_on_the_queue_is_termed_not_retried(rig: TaskRig) -> None:
    dispatcher = await rig.dispatcher()
    await rig.worker("wa", "echo")
    ctl = await rig.clients("ctl-1")
    js = ctl.jetstream()
    tasks = await rig.tasks()
    _, misplaced = make_task("resize", task_id="t-misplaced")

    await js.publish("tasks.echo.queue", b"not json", headers={"Nats-Msg-Id": "junk-1"})
    await js.publish("tasks.echo.queue", misplaced, headers={"Nats-Msg-Id": "t-misplaced"})
    good = await tasks.submit("echo", {"n": 1})
    await tasks.wait(good.task.id, within=10)
    await until(lambda: dispatcher.counts["refused"] == 2, within=10)

    await rig.queue_drained()
    assert await tasks.get("t-misplaced") is None
    assert [e["task"] for e in rig.entries("start")] == [good.task.id]


async def test_a_task_past_max_deliver_is_dead_lettered_not_left_behind(rig: TaskRig) -> None:
    queue = QueueSettings(ack_wait=0.5, max_deliver=3)
    await rig.dispatcher(fast_settings(queue=queue))
    issuer = TokenIssuer.from_file(rig.pki.dir / "signing.key", issuer="tests")
    tasks = TaskClient(
        await rig.clients("op-1"), token=lambda: issuer.mint("op-1", ["tasks:submit"])
    )

    submitted = await tasks.submit("echo", {"n": 1})
    assert submitted.task.token is not None
    record = await tasks.wait(submitted.task.id, within=10)

    assert (record.state, record.attempts) == (TaskState.DEAD, 0)
    assert record.error == "delivered 3 times without finishing (max_deliver)"
    await rig.queue_drained()
    # The dead letter is the task as it would run: its submit token is not kept.
    [letter] = await tasks.dead("echo")
    assert letter.task.id == submitted.task.id and letter.task.token is None
