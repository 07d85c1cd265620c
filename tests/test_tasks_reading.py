"""`fabric task ls` and `fabric task dead ls|retry` as a user runs them: the CLI as a
subprocess against a real server, a dispatcher and a worker process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from fleetfixtures import controller_config, running
from natsfixtures import FabricPki
from test_tasks_cli import fabric
from workers.rig import TaskRig, fast_settings, task_rig

from fabric.controller.service import Controller
from fabric.tasks.client import TaskClient
from fabric.tasks.records import TaskState
from schemas import subjects
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.discovery import DiscoverReply, DiscoverRequest, TaskBacklog


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        await rig.dispatcher()
        await rig.worker("wa", "echo")
        yield rig


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


# --- the backlog per type: discovery (a viewer may ask) and `fabric top` ------------


async def test_backlog_per_type_on_discover_for_a_viewer_and_in_top(
    rig: TaskRig, pki: FabricPki
) -> None:
    # A real controller beside the rig's dispatcher: its own dispatcher sees no
    # agent at all, and is kept off "echo" so the rig's runs it.
    ctl = Controller(await rig.clients("ctl-1"), controller_config(pki, "ctl-2"))
    ctl.task_settings = fast_settings(type_limits={"echo": 0})  # type: ignore[attr-defined]
    tasks = await rig.tasks()
    viewer = await rig.clients("view-1")

    async def backlog() -> dict[str, TaskBacklog]:
        ask = encode(DiscoverRequest(what="tasks"))
        reply = decode(
            (await viewer.request(subjects.DISCOVER, ask, timeout=5)).data, DiscoverReply
        )
        return {t.type: t for t in reply.tasks}

    async with running(ctl):
        await tasks.submit("echo", {"sleep": 4, "progress": 0.3}, task_id="long-1")
        await tasks.submit("nobody", {"n": 1}, task_id="idle-1")
        await tasks.submit("nobody", {"n": 2}, task_id="idle-2")
        why = "no running agent serves 'nobody'"
        want = {
            "echo": TaskBacklog(type="echo", backlog=1, running=1),
            "nobody": TaskBacklog(type="nobody", backlog=2, waiting=2, reasons={why: 2}),
        }
        seen: dict[str, TaskBacklog] = {}
        async with asyncio.timeout(10):
            while (seen := await backlog()) != want:
                pass  # each round is a request to the controller: no pause needed

        code, out, err = await top(rig)
        assert code == 0, err
        snap = json.loads(out)
        assert {t["type"]: (t["backlog"], t["running"], t["waiting"]) for t in snap["tasks"]} == {
            "echo": (1, 1, 0),
            "nobody": (2, 0, 2),
        }
        code, out, err = await top(rig, as_json=False)
        assert code == 0, err
        lines = out.splitlines()
        at = lines.index("TASKS")
        assert lines[at + 1].split() == ["TYPE", "BACKLOG", "RUNNING", "WAITING", "WHY"]
        assert lines[at + 3].split()[:4] == ["nobody", "2", "0", "2"]
        assert lines[at + 3].endswith(why)

        assert (await tasks.wait("long-1", within=15)).state is TaskState.SUCCEEDED
        async with asyncio.timeout(10):
            while "echo" in (seen := await backlog()):
                pass
        assert seen == {"nobody": want["nobody"]}


async def top(rig: TaskRig, *, as_json: bool = True) -> tuple[int, str, str]:
    """`fabric top --once` as the viewer identity (no token key)."""
    viewer = rig.pki["view-1"]
    env = {
        **{k: v for k, v in os.environ.items() if k != "FABRIC_TOKEN_KEY"},
        "FABRIC_NATS_URL": rig.server.url,
        "FABRIC_CA": str(rig.pki.ca),
        "FABRIC_CERT": str(viewer.cert),
        "FABRIC_KEY": str(viewer.key),
    }
    argv = ["top", "--once", *(["--json"] if as_json else [])]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabric", *argv,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def bare(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    """A server and nothing else: no dispatcher, no worker."""
    async with task_rig(pki, tmp_path) as rig:
        yield rig


async def test_pending_says_when_no_controller_has_taken_the_queue(bare: TaskRig) -> None:
    # The queue's state exists (a controller ran once), but none runs now.
    await bare.dispatcher()
    _, running_dispatcher = bare.dispatchers.pop()
    running_dispatcher.cancel()
    await asyncio.gather(running_dispatcher, return_exceptions=True)
    tasks = await bare.tasks()
    await tasks.submit("echo", {"n": 1}, task_id="orphan-1")

    code, out, err = await fabric(bare, "ls", "--pending")
    assert code == 0, err
    assert out.splitlines()[1:] == []  # no record: nobody took it
    assert "and 1 task(s) in the queue no controller has taken yet" in err


async def test_an_empty_fabric_answers_the_backlog_at_once(bare: TaskRig, pki: FabricPki) -> None:
    ctl = Controller(await bare.clients("ctl-1"), controller_config(pki, "ctl-1"))
    viewer = await bare.clients("view-1")
    async with running(ctl):
        await asyncio.wait_for(ctl.dispatcher.ready.wait(), 10)
        started = time.monotonic()
        msg = await viewer.request(subjects.DISCOVER, encode(DiscoverRequest(what="tasks")), 5)
        reply = decode(msg.data, DiscoverReply)
        # The record watch saw the (empty) bucket: no wait for the first answer.
        assert time.monotonic() - started < 1.5
    assert (reply.tasks, reply.answered_by) == ([], "ctl-1")
