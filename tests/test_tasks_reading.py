"""`fabric task ls` and `fabric task dead ls|retry` as a user runs them: the CLI as a
subprocess against a real server, a dispatcher and a worker process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from natsfixtures import Clients, FabricPki
from test_tasks_cli import fabric
from workers.rig import TaskRig

from fabric.nats_server import NatsServer
from fabric.tasks.client import TaskClient
from fabric.tasks.records import TaskState
from schemas.common import utc_now


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = TaskRig(pki, server, tmp_path, Clients(pki, default_urls=server.url))
    try:
        await rig.dispatcher()
        await rig.worker("wa", "echo")
        yield rig
    finally:
        await rig.aclose()
        await server.stop()


async def ls(rig: TaskRig, *args: str) -> list[dict[str, object]]:
    code, out, err = await fabric(rig, *args, "--json")
    assert code == 0, err
    found = json.loads(out)
    assert isinstance(found, list)
    return found


async def test_ls_filters_by_type_state_and_shows_why_tasks_wait(rig: TaskRig) -> None:
    tasks = await rig.tasks()
    await tasks.submit("echo", {"n": 1}, task_id="ok-1")
    await tasks.submit("echo", {"fail": "no"}, task_id="bad-1", max_attempts=1)
    await tasks.submit("nobody", {"n": 2}, task_id="wait-1")
    await tasks.wait("ok-1", within=15)
    await tasks.wait("bad-1", within=15)
    await rig.record_until(tasks.nc, "wait-1", lambda r: bool(r.waiting))

    every, echo, dead, pending, newest = await asyncio.gather(
        ls(rig, "ls"),
        ls(rig, "ls", "--type", "echo"),
        ls(rig, "ls", "--state", "dead"),
        ls(rig, "ls", "--pending"),
        ls(rig, "ls", "--limit", "1"),
    )
    assert {r["id"]: r["state"] for r in every} == {
        "ok-1": "succeeded",
        "bad-1": "dead",
        "wait-1": "queued",
    }
    assert [r["id"] for r in every] == ["ok-1", "bad-1", "wait-1"], "oldest submission first"
    assert sorted(r["id"] for r in echo) == ["bad-1", "ok-1"]
    assert [(r["id"], r["error"]) for r in dead] == [("bad-1", "RuntimeError: no")]
    assert [(r["id"], r["waiting"]) for r in pending] == [
        ("wait-1", "no running agent serves 'nobody'")
    ]
    assert [r["id"] for r in newest] == ["wait-1"]
    assert set(every[0]) >= {"id", "type", "state", "attempts", "submitted_by", "waiting"}

    code, out, err = await fabric(rig, "ls", "--pending")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "TYPE", "STATE"] and header.split()[-1] == "WAITING"
    assert len(rows) == 1 and rows[0].split()[:3] == ["wait-1", "nobody", "queued"]
    assert rows[0].endswith("no running agent serves 'nobody'")

    code, _, err = await fabric(rig, "ls", "--state", "sleeping")
    assert code == 2 and "invalid choice" in err


async def test_dead_ls_and_retry_runs_the_same_id_again(rig: TaskRig) -> None:
    tasks = await rig.tasks()
    # Past its deadline when taken: dead at once, never run.
    await tasks.submit("echo", {"n": 3}, task_id="late-1", deadline=utc_now() - timedelta(1))
    await tasks.submit("echo", {"fail": "always"}, task_id="doomed-1", max_attempts=1)
    for task_id in ("late-1", "doomed-1"):
        assert (await tasks.wait(task_id, within=15)).state is TaskState.DEAD
    await tasks.submit("echo", {"n": 4}, task_id="fine-1")
    await tasks.wait("fine-1", within=15)

    letters = await ls(rig, "dead", "ls")
    assert {d["task"]["id"]: d["state"] for d in letters} == {"late-1": "dead", "doomed-1": "dead"}
    late = next(d for d in letters if d["task"]["id"] == "late-1")
    assert late["error"] == "deadline passed before the task could run"
    assert late["attempts"] == 0 and late["task"]["payload"] == {"n": 3}
    code, out, _ = await fabric(rig, "dead", "ls", "--type", "echo")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "TYPE", "STATE"]
    assert len(out.splitlines()) == 3

    # The retry: same id, a new attempt budget, the passed deadline dropped.
    code, out, err = await fabric(rig, "dead", "retry", "late-1", "--wait", "--timeout", "20")
    assert code == 0, err
    assert out.splitlines()[0] == "retried late-1 (echo, retry 1)"
    assert json.loads("\n".join(out.splitlines()[1:])) == {"echo": {"n": 3}, "agent": "wa"}
    record = await tasks.get("late-1")
    assert record is not None
    assert (record.state, record.attempts, record.retries) == (TaskState.SUCCEEDED, 1, 1)
    assert record.submitted_by == "op-1"
    assert [e["task"] for e in rig.entries("start")].count("late-1") == 1

    # Retried and done: gone from the listing, shown as such with --all.
    assert [d["task"]["id"] for d in await ls(rig, "dead", "ls")] == ["doomed-1"]
    every = {d["task"]["id"]: d for d in await ls(rig, "dead", "ls", "--all")}
    assert (every["late-1"]["state"], every["late-1"]["retries"]) == ("succeeded", 1)

    # A retry that dies again is a dead letter again, with its retry counted.
    code, _, err = await fabric(rig, "dead", "retry", "doomed-1", "--wait", "--timeout", "20")
    assert code == 1 and "is dead after 1 attempt(s): RuntimeError: always" in err
    again = await ls(rig, "dead", "ls")
    assert [(d["task"]["id"], d["state"], d["retries"]) for d in again] == [("doomed-1", "dead", 1)]
    assert [e["task"] for e in rig.entries("start")].count("doomed-1") == 2

    results = await asyncio.gather(
        fabric(rig, "dead", "retry", "fine-1"),
        fabric(rig, "dead", "retry", "never-was"),
        fabric(rig, "dead", "retry", "Bad Id"),
    )
    (c1, _, e1), (c2, _, e2), (c3, _, e3) = results
    assert c1 == 1 and "is succeeded: only a dead task can be retried" in e1
    assert c2 == 1 and "no dead letter for task 'never-was'" in e2
    assert c3 == 2 and "invalid_id" in e3


async def test_two_retries_of_one_dead_task_run_it_once(rig: TaskRig) -> None:
    tasks = await rig.tasks()
    await tasks.submit("echo", {"n": 5}, task_id="twice-1", deadline=utc_now() - timedelta(1))
    assert (await tasks.wait("twice-1", within=15)).state is TaskState.DEAD
    # Two operators at once: both compute retry 1; the message id dedupes them.
    other = TaskClient(tasks.nc, submitted_by="op-2")
    first, second = await asyncio.gather(tasks.retry("twice-1"), other.retry("twice-1"))
    assert {first.duplicate, second.duplicate} == {False, True}
    record = await tasks.wait("twice-1", within=15, retry=1)
    assert (record.state, record.retries) == (TaskState.SUCCEEDED, 1)
    await rig.queue_drained()
    assert [e["task"] for e in rig.entries("start")] == ["twice-1"]
