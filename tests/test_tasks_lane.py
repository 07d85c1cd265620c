"""The dispatcher's batched lane (fabric.tasks.lane) on a real nats-server with
real worker processes: many fresh tasks in few messages, nothing lost, and
every case the lane does not take handed to the one-by-one path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agents.harness import until
from nats.aio.msg import Msg
from natsfixtures import FabricPki
from workers.rig import TaskRig, fast_settings, task_rig

from fabric.tasks.agents import Candidate
from fabric.tasks.client import make_task
from fabric.tasks.records import (
    TaskState,
    decode_record,
    encode_record,
    new_record,
    started,
    succeeded,
)
from fabric.tasks.stream import QueueSettings
from schemas.common import utc_now
from schemas.task import BATCH_HEADER, TaskOutcome, TaskResult


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        yield rig


class Seen:
    """Messages on agents.*.tasks, as a controller identity sees them."""

    def __init__(self) -> None:
        self.batches = 0
        self.assignments = 0
        self.single = 0

    async def on_msg(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(BATCH_HEADER) == "1":
            self.batches += 1
            self.assignments += len(json.loads(msg.data)["assignments"])
        else:
            self.single += 1


async def _watch_assignments(rig: TaskRig) -> Seen:
    nc = await rig.clients("ctl-1")
    seen = Seen()
    await nc.subscribe("agents.*.tasks", cb=seen.on_msg)
    await nc.flush()
    return seen


async def test_a_burst_goes_out_in_batches_and_every_task_succeeds(rig: TaskRig) -> None:
    dispatcher = await rig.dispatcher(fast_settings(batch=64, agent_limit=64))
    await rig.worker("wa", "echo", concurrency=16)
    await rig.worker("wb", "echo", concurrency=16)
    seen = await _watch_assignments(rig)
    tasks = await rig.tasks()
    events = await rig.subscribe_events(tasks.nc, "events.task.completed")

    submitted = await asyncio.gather(*(tasks.submit("echo", {"n": n}) for n in range(200)))
    ids = {s.task.id for s in submitted}
    await events.wait_for(lambda _: len({e["subject"] for e in events.items} & ids) == 200)

    records = [await tasks.get(i) for i in sorted(ids)]
    assert all(r is not None and r.state is TaskState.SUCCEEDED for r in records)
    assert all(r is not None and r.attempts == 1 for r in records)
    # Every task went out in a batch, and a batch carried many of them.
    assert (seen.assignments, seen.single) == (200, 0)
    assert seen.batches < 100
    assert dispatcher.lane is not None
    assert dispatcher.counts["succeeded"] == 200 and dispatcher.lane.pipe.timeouts == 0
    # Ran exactly once each, as the workers' own ledger says.
    starts = [e["task"] for e in rig.entries("start")]
    assert sorted(starts) == sorted(ids)
    await rig.queue_drained()


async def test_tasks_beyond_the_free_slots_wait_in_the_lane_and_all_run(rig: TaskRig) -> None:
    await rig.dispatcher(fast_settings(agent_limit=2, busy_hold=30))
    await rig.worker("wa", "echo", concurrency=2)
    seen = await _watch_assignments(rig)
    tasks = await rig.tasks()

    submitted = await asyncio.gather(
        *(tasks.submit("echo", {"sleep": 0.05, "progress": 1}) for _ in range(12))
    )
    for s in submitted:
        record = await tasks.wait(s.task.id, within=20)
        assert record.state is TaskState.SUCCEEDED and record.attempts == 1

    # Never more than the agent's two slots handed out at once: the worker's ledger
    # has at most two started and not yet done at any point.
    running = 0
    peak = 0
    for entry in rig.entries():
        running += 1 if entry["event"] == "start" else -1
        peak = max(peak, running)
    assert peak <= 2
    assert (seen.assignments, seen.single) == (12, 0)


async def test_a_task_whose_record_is_final_already_is_acked_not_run(rig: TaskRig) -> None:
    await rig.dispatcher(fast_settings(queue=QueueSettings(ack_wait=1.5, duplicate_window=1.0)))
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()
    # The record of a task that finished long ago, beyond the duplicate window.
    task, _ = make_task("echo", {"n": 1}, task_id="done-1", submitted_by="op-1")
    result = TaskResult(
        task_id="done-1",
        agent_id="wa",
        attempt=1,
        outcome=TaskOutcome.SUCCEEDED,
        result="old",
        started_at=utc_now(),
        finished_at=utc_now(),
    )
    kv = await (await rig.clients("ctl-1")).jetstream().key_value("fabric_tasks")
    ran = started(new_record(task), "wa", "n1", "ctl-1")
    await kv.create("done-1", encode_record(succeeded(ran, result)))

    again = await tasks.submit("echo", {"n": 2}, task_id="done-1")
    fresh = await tasks.submit("echo", {"n": 3})

    assert not again.duplicate  # not in the stream's window: stored and delivered
    assert (await tasks.wait(fresh.task.id, within=10)).state is TaskState.SUCCEEDED
    await rig.queue_drained()
    entry = await kv.get("done-1")
    assert entry.value is not None
    assert decode_record(entry.value).result == "old"
    assert [e["task"] for e in rig.entries("start")] == [fresh.task.id]


async def test_agent_killed_with_a_batch_in_hand_loses_nothing(rig: TaskRig) -> None:
    await rig.dispatcher(fast_settings(agent_limit=16))
    await rig.worker("wa", "echo", concurrency=8)
    tasks = await rig.tasks()

    gate = rig.base / "gate"
    held = await asyncio.gather(*(tasks.submit("echo", {"gate": str(gate)}) for _ in range(8)))
    await until(lambda: len(rig.entries("start")) == 8, within=15)
    await rig.worker("wb", "echo", concurrency=8)
    rig.kill("wa")
    gate.touch()

    for s in held:
        record = await tasks.wait(s.task.id, within=20)
        assert record.state is TaskState.SUCCEEDED
        assert (record.agent_id, record.attempts) == ("wb", 2)
    await rig.queue_drained()


async def test_without_the_lane_every_task_goes_one_by_one(rig: TaskRig) -> None:
    dispatcher = await rig.dispatcher(fast_settings(lane=False))
    await rig.worker("wa", "echo")
    seen = await _watch_assignments(rig)
    tasks = await rig.tasks()

    submitted = await asyncio.gather(*(tasks.submit("echo", {"n": n}) for n in range(5)))
    for s in submitted:
        assert (await tasks.wait(s.task.id, within=10)).state is TaskState.SUCCEEDED

    assert dispatcher.lane is None
    assert (seen.batches, seen.single) == (0, 5)


async def test_a_long_task_shows_running_in_its_record_a_short_one_does_not(
    rig: TaskRig,
) -> None:
    # Long enough that the short task ends well before it, even on a loaded machine.
    await rig.dispatcher(fast_settings(running_after=2.0, watch_every=0.05))
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()
    gate = rig.base / "gate"

    kv = await tasks.nc.jetstream().key_value("fabric_tasks")
    watcher = await kv.watch("short-1")  # subscribed: sees every version from here
    short = await tasks.submit("echo", {"n": 1}, task_id="short-1")
    short_versions = []
    async with asyncio.timeout(10):
        async for entry in watcher:
            if entry is not None and entry.value is not None:
                short_versions.append(decode_record(entry.value).state)
                if short_versions[-1] is TaskState.SUCCEEDED:
                    break
    await watcher.stop()  # type: ignore[no-untyped-call]
    held = await tasks.submit("echo", {"gate": str(gate)})
    versions = await rig.record_until(
        tasks.nc, held.task.id, lambda r: r.state is TaskState.RUNNING, within=10
    )
    gate.touch()
    record = await tasks.wait(held.task.id, within=10)

    # The short one was written once, final; the held one first as running.
    assert short.task.id == "short-1" and short_versions == [TaskState.SUCCEEDED]
    running = versions[-1]
    assert (running.agent_id, running.node_id, running.attempts) == ("wa", "n1", 0)
    assert record.state is TaskState.SUCCEEDED and record.attempts == 1


async def test_an_agent_nobody_listens_for_is_shunned_and_costs_no_attempt(
    rig: TaskRig,
) -> None:
    dispatcher = await rig.dispatcher()
    await rig.worker("wb", "echo")
    # In the view, serving echo, chosen first (ties go by id), but no process.
    rig.view["wa"] = Candidate("wa", "n1", frozenset({"echo"}))
    tasks = await rig.tasks()

    submitted = await tasks.submit("echo", {"n": 1})
    record = await tasks.wait(submitted.task.id, within=15)

    assert record.state is TaskState.SUCCEEDED
    assert (record.agent_id, record.attempts) == ("wb", 1)
    assert dispatcher.counts["handed_back"] >= 1


async def test_a_task_held_past_busy_hold_goes_back_and_says_why(rig: TaskRig) -> None:
    dispatcher = await rig.dispatcher(fast_settings(agent_limit=1, busy_hold=0.3))
    await rig.worker("wa", "echo")
    tasks = await rig.tasks()
    gate = rig.base / "gate"

    held = await tasks.submit("echo", {"gate": str(gate)})
    await until(lambda: len(rig.entries("start")) == 1, within=10)
    second = await tasks.submit("echo", {"n": 2})
    versions = await rig.record_until(
        tasks.nc, second.task.id, lambda r: r.waiting != "", within=10
    )
    gate.touch()
    record = await tasks.wait(second.task.id, within=15)

    # It waited in the lane for the one slot, then went back with its reason
    # recorded, and ran once the slot freed.
    assert "busy" in versions[-1].waiting and versions[-1].state is TaskState.QUEUED
    assert dispatcher.counts["waiting"] >= 1
    assert record.state is TaskState.SUCCEEDED and record.attempts == 1
    assert (await tasks.wait(held.task.id, within=10)).state is TaskState.SUCCEEDED
    assert sorted(e["task"] for e in rig.entries("start")) == sorted([held.task.id, second.task.id])
