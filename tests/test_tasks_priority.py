"""Task priority: the pure slot queue, then a real controller, node and worker.

The end-to-end test holds one low-priority task on its only slot (the worker
waits for a gate file), queues more low ones and then a few high ones
behind it, and checks from the worker's own ledger and the stored records
that every high task ran before the lows that were waiting with it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agents.harness import until
from fleetfixtures import controller_config, running
from natsfixtures import Clients, FabricPki
from test_tasks_fleet import WorkerFleet, api, node_ready
from workers.rig import LEDGER_WORKER, TaskRig, fast_settings

from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tasks.priority import SlotQueue, by_priority, rank
from fabric.tasks.records import TaskState
from fabric.tasks.stream import DISPATCH_CONSUMER, TASKS_STREAM

ROOT = Path(__file__).resolve().parents[1]

# --- pure ---------------------------------------------------------------------


def test_rank_orders_higher_priority_then_earlier_arrival() -> None:
    assert sorted([rank(1, 0), rank(9, 5), rank(9, 2), rank(5, 1)]) == [
        rank(9, 2),
        rank(9, 5),
        rank(5, 1),
        rank(1, 0),
    ]


def test_by_priority_is_stable_within_a_priority() -> None:
    items = [("a", 1), ("b", 9), ("c", 1), ("d", 9), ("e", 5)]
    assert [n for n, _ in by_priority(items, lambda i: i[1])] == ["b", "d", "e", "a", "c"]


def test_slot_queue_first_is_the_best_waiter_of_its_type() -> None:
    q = SlotQueue()
    low = q.join("echo", 1, arrival=1)
    other = q.join("exec", 0, arrival=2)
    assert q.first(low) and q.first(other)  # types do not compete
    high = q.join("echo", 9, arrival=3)
    mid = q.join("echo", 5, arrival=4)
    high2 = q.join("echo", 9, arrival=5)
    assert [q.first(t) for t in (low, high, mid, high2)] == [False, True, False, False]
    assert (q.ahead(high), q.ahead(high2), q.ahead(mid), q.ahead(low)) == (0, 1, 2, 3)
    assert q.waiting("echo") == 4 and q.waiting() == 5
    q.leave(high)
    assert q.first(high2)
    q.leave(high2)
    q.leave(high2)  # twice: a no-op
    assert q.first(mid)
    q.leave(mid)
    q.leave(low)
    q.leave(other)
    assert q.waiting() == 0


def test_slot_queue_same_rank_twice_stays_two_waiters() -> None:
    q = SlotQueue()
    a = q.join("echo", 5, arrival=1)
    b = q.join("echo", 5, arrival=1)
    assert a != b and q.waiting("echo") == 2
    q.leave(a)
    assert q.first(b)


# --- real controller, node and worker --------------------------------------------


@pytest.fixture
async def stack(pki: FabricPki, tmp_path: Path) -> AsyncIterator[tuple[TaskRig, WorkerFleet]]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = TaskRig(pki, server, tmp_path, Clients(pki, default_urls=server.url))
    fleet = WorkerFleet(pki, server, tmp_path)
    # A loaded machine must not make the node look lost (its agents leave the
    # view and waiters go back to the queue): this test is about order only.
    config = controller_config(pki, "ctl-1", node_timeout=10.0)
    ctl = Controller(await rig.clients("ctl-1"), config)
    # One "prio" task at a time, and waiters held for the whole test (not
    # handed back after busy_hold), so the order is the dispatcher's choice.
    ctl.task_settings = fast_settings(  # type: ignore[attr-defined]
        ack_wait=10.0, busy_hold=120.0, type_limits={"prio": 1}
    )
    try:
        async with running(ctl):
            fleet.start("n1")
            yield rig, fleet
            await fleet.stop_all()
    finally:
        await fleet.stop_all()
        await rig.aclose()
        await server.stop()


async def test_high_priority_tasks_take_the_slot_before_waiting_low_ones(
    stack: tuple[TaskRig, WorkerFleet], pki: FabricPki, tmp_path: Path
) -> None:
    rig, _fleet = stack
    tasks = await rig.tasks()
    js = tasks.nc.jetstream()
    await node_ready(tasks.nc, "n1")
    spec = {
        "name": "prio-w",
        "argv": [
            sys.executable, str(LEDGER_WORKER), str(rig.ledger), "prio", "--concurrency", "1",
        ],
        "capabilities": ["prio"],
        # The worker imports fabric from this tree, however the package is installed.
        "env": {"PYTHONPATH": str(ROOT)},
        "start_seconds": 0,
        "stop_timeout": 3,
    }  # fmt: skip
    await api(tasks.nc, "create", {"deployment": {"spec": spec}}, pki)

    gate = tmp_path / "gate"
    first = await tasks.submit("prio", {"gate": str(gate)}, task_id="low-0", priority=1)
    await until(lambda: [e["task"] for e in rig.entries("start")] == ["low-0"], within=30)

    lows = [f"low-{i}" for i in range(1, 9)]
    highs = [f"high-{i}" for i in range(1, 4)]
    for task_id in lows:
        await tasks.submit("prio", {}, task_id=task_id, priority=1)
    for task_id in highs:
        await tasks.submit("prio", {}, task_id=task_id, priority=8)

    # Every one of them fetched and held by the dispatcher (none left in the
    # stream, one running plus eleven waiting), before the slot frees.
    async with asyncio.timeout(20):
        while True:
            info = await js.consumer_info(TASKS_STREAM, DISPATCH_CONSUMER)
            if info.num_pending == 0 and info.num_ack_pending == 1 + len(lows) + len(highs):
                break
            await asyncio.sleep(0.02)  # wait-ok: polling the server under a deadline
    assert [e["task"] for e in rig.entries("start")] == ["low-0"]
    gate.touch()

    records = {t: await tasks.wait(t, within=30) for t in [first.task.id, *lows, *highs]}
    assert all(r.state is TaskState.SUCCEEDED for r in records.values())
    order = [e["task"] for e in rig.entries("start")]
    # Highs first (in their own submission order), then the lows first come first served.
    assert order == ["low-0", *highs, *lows]
    started = {t: r.started_at for t, r in records.items()}
    assert all(started[h] is not None for h in highs)
    assert max(started[h] for h in highs) < min(started[t] for t in lows)  # type: ignore[type-var]
    assert all(r.priority == (8 if t in highs else 1) for t, r in records.items())
