"""Two dispatchers share the durable consumer; one is SIGKILLed under load and
nothing is lost: every task ends succeeded, each handler effect is in the
ledger, and the dead dispatcher's tasks are redelivered after the ack wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from natsfixtures import FabricPki
from workers.rig import TaskRig, task_rig

from fabric.tasks.records import TaskState

TASKS = 300


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        yield rig


async def test_kill_9_of_a_dispatcher_under_load_loses_nothing(rig: TaskRig) -> None:
    await rig.worker("wa", "echo", concurrency=16)
    await rig.worker("wb", "echo", concurrency=16)
    agents = {"wa": "echo", "wb": "echo"}
    d1 = await rig.dispatcher_proc("d1", 1.5, agents)
    await rig.dispatcher_proc("d2", 1.5, agents)
    tasks = await rig.tasks()
    done = await rig.subscribe_events(tasks.nc, "events.task.completed")

    ids = [f"load-{i}" for i in range(TASKS)]
    await asyncio.gather(*(tasks.submit("echo", {"sleep": 0.02}, task_id=i) for i in ids))
    await done.wait_for(lambda _: len(done.items) >= TASKS // 5)
    d1.kill()
    d1.wait(timeout=10)
    await done.wait_for(lambda _: len({e["subject"] for e in done.items}) >= TASKS, within=40)

    records = await asyncio.gather(*(tasks.get(i) for i in ids))
    assert all(r is not None and r.state is TaskState.SUCCEEDED for r in records)
    assert {e["task"] for e in rig.entries("done")} == set(ids), "every effect in the ledger"
    starts = [e["task"] for e in rig.entries("start")]
    assert len(starts) > TASKS, "d1 held tasks when it died: redelivered, run again"
    await rig.queue_drained()
