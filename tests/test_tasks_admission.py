"""The submit token (fabric.tasks.admission): a real controller refuses bad tokens
with their codes (record ``refused``, audit event, counter, message termed,
never run), takes the submitter from a good one, and strips it before a worker
sees the task; the CLI submits with a token of its own."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agents.harness import until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetfixtures import controller_config, running
from nats.aio.msg import Msg
from natsfixtures import FabricPki
from workers.rig import TaskRig, fast_settings, task_rig

from fabric.controller.service import Controller
from fabric.tasks.admission import Admission, attach, scopes_for
from fabric.tasks.client import TaskClient, make_task
from fabric.tasks.records import TaskState
from fabric.tasks.stream import QueueSettings
from fabric.tokens import TokenIssuer
from schemas.codec import decode
from schemas.errors import ContractError, ErrorCode
from schemas.task import BATCH_HEADER, TaskAssignment, TaskBatch


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        yield rig


@pytest.fixture
async def controller(rig: TaskRig, pki: FabricPki) -> AsyncIterator[Controller]:
    """A real controller that requires submit tokens (as `fabric up` runs it), no nodes."""
    config = controller_config(pki, "ctl-1", require_submit_token=True)
    ctl = Controller(await rig.clients("ctl-1"), config)
    ctl.task_settings = fast_settings()  # type: ignore[attr-defined]
    async with running(ctl):
        await asyncio.wait_for(ctl.dispatcher.ready.wait(), 10)
        yield ctl


def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", "admission-test")


def keys(pki: FabricPki) -> Admission:
    return Admission.from_files(pki.dir / "signing.pub", require_token=True)


async def test_bad_tokens_are_refused_with_codes_and_never_run(
    rig: TaskRig, controller: Controller, pki: FabricPki
) -> None:
    op = await rig.clients("op-1")
    audit = await rig.subscribe_events(op, "events.controller.refused")
    mint = issuer(pki)
    now = time.time()
    cases: dict[str, tuple[str | None, ErrorCode]] = {
        "t-missing": (None, ErrorCode.TOKEN_MISSING),
        "t-junk": ("not.a.token", ErrorCode.TOKEN_INVALID),
        "t-forged": (
            TokenIssuer(Ed25519PrivateKey.generate(), "evil").mint("op-1", ["tasks:submit"]),
            ErrorCode.TOKEN_INVALID,
        ),
        "t-expired": (
            mint.mint("op-1", ["tasks:submit"], not_before=now - 300, ttl=60),
            ErrorCode.TOKEN_EXPIRED,
        ),
        "t-early": (
            mint.mint("op-1", ["tasks:submit"], not_before=now + 300),
            ErrorCode.TOKEN_NOT_YET_VALID,
        ),
        "t-scope": (mint.mint("op-1", ["read"]), ErrorCode.TOKEN_SCOPE),
        "t-bound": (
            mint.mint("op-1", ["tasks:submit"], agent="wa"),
            ErrorCode.TOKEN_WRONG_TARGET,
        ),
    }
    for task_id, (token, _) in cases.items():
        # The submitter claims to be someone; nothing verified says so.
        client = TaskClient(
            op, submitted_by="mallory", token=(lambda t=token: t) if token else None
        )
        await client.submit("echo", {"n": 1}, task_id=task_id)

    tasks = TaskClient(op)
    records = await asyncio.gather(*(tasks.wait(i, within=15) for i in cases))
    for record, (task_id, (_, code)) in zip(records, cases.items(), strict=True):
        assert (record.id, record.state, record.code) == (task_id, TaskState.REFUSED, code)
        assert (record.attempts, record.agent_id, record.submitted_by) == (0, None, "")
    await rig.queue_drained()  # termed: none of them is in the queue any more

    seen = await audit.wait_for(lambda _: len(audit.items) >= len(cases))
    assert seen["source"] == "/controllers/ctl-1"
    by_target = {e["data"]["target"]: e["data"] for e in audit.items}
    for task_id, (_, code) in cases.items():
        assert (by_target[task_id]["code"], by_target[task_id]["op"]) == (code.value, "submit")
        assert by_target[task_id]["verified"] is False
    assert by_target["t-expired"]["claimed_by"] == "op-1"  # read, not trusted
    assert by_target["t-missing"]["claimed_by"] is None
    assert controller.refused[ErrorCode.TOKEN_INVALID.value] == 2
    assert controller.refused[ErrorCode.TOKEN_EXPIRED.value] == 1


async def test_a_good_token_names_the_submitter_and_admits_one_task_only(
    rig: TaskRig, controller: Controller, pki: FabricPki
) -> None:
    op = await rig.clients("op-1")
    token = issuer(pki).mint("alice", ["tasks:submit"])
    tasks = TaskClient(op, submitted_by="mallory", token=lambda: token)

    await tasks.submit("nobody", {"n": 1}, task_id="mine-1")
    seen = await rig.record_until(op, "mine-1", lambda r: bool(r.waiting))
    assert (seen[-1].state, seen[-1].submitted_by) == (TaskState.QUEUED, "alice")

    # The same token on another task: a replay. The first one is left alone.
    await tasks.submit("nobody", {"n": 2}, task_id="mine-2")
    replay = await tasks.wait("mine-2", within=15)
    assert (replay.state, replay.code) == (TaskState.REFUSED, ErrorCode.TOKEN_REPLAYED)
    assert "already submitted task 'mine-1'" in (replay.error or "")
    first = await tasks.get("mine-1")
    assert first is not None and first.state is TaskState.QUEUED and first.submitted_by == "alice"
    # Waiting redelivers mine-1 again and again: the same token for the same id is no replay.
    waited = controller.dispatcher.counts["waiting"]
    await until(lambda: controller.dispatcher.counts["waiting"] >= waited + 2, within=10)
    assert controller.refused[ErrorCode.TOKEN_REPLAYED.value] == 1
    assert controller.dispatcher.counts["refused"] == 1


async def test_a_bad_retry_and_a_refusal_never_touch_a_real_record(
    rig: TaskRig, controller: Controller, pki: FabricPki
) -> None:
    op = await rig.clients("op-1")
    mint = issuer(pki)
    tasks = TaskClient(op, token=lambda: mint.mint("op-1", ["tasks:submit"]))
    await tasks.submit("nobody", {"n": 1}, task_id="real-1")
    await rig.record_until(op, "real-1", lambda r: bool(r.waiting))

    # The same id again, past the dedupe (a retry number), with no token: refused,
    # and the real task's record stays as it was.
    await TaskClient(op).submit("nobody", {"n": 9}, task_id="real-1", retry=1)
    # A retry of a task that is not dead: refused with invalid_state.
    await tasks.submit("nobody", {"n": 9}, task_id="real-1", retry=2)
    await until(lambda: controller.dispatcher.counts["refused"] >= 2, within=15)
    record = await tasks.get("real-1")
    assert record is not None
    assert (record.state, record.retries, record.code) == (TaskState.QUEUED, 0, None)
    assert controller.refused[ErrorCode.TOKEN_MISSING.value] == 1
    assert controller.refused[ErrorCode.INVALID_STATE.value] == 1


async def test_an_admitted_task_runs_and_its_worker_never_sees_the_token(
    rig: TaskRig, pki: FabricPki
) -> None:
    dispatcher = await rig.dispatcher()
    attach(dispatcher, keys(pki))
    await rig.worker("wa", "echo")
    ctl = await rig.clients("ctl-1")  # may listen on agents.>: sees the assignment
    assignments: list[TaskAssignment] = []

    async def on_assignment(msg: Msg) -> None:
        # The dispatcher's batched lane sends a TaskBatch (header Fabric-Batch).
        if (msg.headers or {}).get(BATCH_HEADER):
            assignments.extend(decode(msg.data, TaskBatch).assignments)
        else:
            assignments.append(decode(msg.data, TaskAssignment))

    await ctl.subscribe("agents.wa.tasks", cb=on_assignment)
    await ctl.flush()
    tasks = TaskClient(
        await rig.clients("op-1"), token=lambda: issuer(pki).mint("bob", ["tasks:submit"])
    )

    record = await tasks.run("echo", {"n": 2}, within=15)
    assert (record.state, record.submitted_by) == (TaskState.SUCCEEDED, "bob")
    assert record.result == {"echo": {"n": 2}, "agent": "wa"}
    assert [(a.task.id, a.task.token, a.task.submitted_by) for a in assignments] == [
        (record.id, None, "bob")
    ]


async def test_a_refused_id_sent_again_later_is_settled_without_a_task_event(
    rig: TaskRig, pki: FabricPki
) -> None:
    # A short duplicate window, so the same id can be stored again within the test.
    queue = QueueSettings(ack_wait=1.5, duplicate_window=0.3)
    dispatcher = await rig.dispatcher(fast_settings(queue=queue))
    attach(dispatcher, keys(pki))
    op = await rig.clients("op-1")
    events: list[str] = []

    async def on_event(msg: Msg) -> None:
        events.append(msg.subject)

    await op.subscribe("events.task.>", cb=on_event)
    await op.flush()
    untokened = TaskClient(op)
    await untokened.submit("echo", {"n": 1}, task_id="r-1")
    await until(lambda: dispatcher.counts["refused"] == 1, within=15)
    seen = await rig.record_until(op, "r-1", lambda r: r.state is TaskState.REFUSED)
    assert seen[-1].code is ErrorCode.TOKEN_MISSING

    # Past the window the same id is stored again, this time with a good token:
    # its record is final, so it is acked as settled (before the fix it was
    # announced as a dead task).
    tokened = TaskClient(op, token=lambda: issuer(pki).mint("op-1", ["tasks:submit"]))
    async with asyncio.timeout(15):
        # The window is time itself: nothing to wait on but the server's answer.
        while (await tokened.submit("echo", {"n": 2}, task_id="r-1")).duplicate:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # wait-ok: polled under a deadline
    await until(lambda: dispatcher.counts["duplicates"] >= 1, within=15)
    await op.flush()
    assert events == []
    after = await untokened.get("r-1")
    assert after is not None and after.state is TaskState.REFUSED


def test_tokens_are_checked_as_of_when_the_task_was_stored(pki: FabricPki) -> None:
    admission = keys(pki)
    mint = issuer(pki)
    token = mint.mint("op-1", ["tasks:submit"], ttl=60)
    task, _ = make_task("echo", {"n": 1}, task_id="t1", token=token, submitted_by="x")
    now = time.time()

    # Stored while valid, taken an hour later (it waited for an agent): admitted.
    admitted = admission.check(task, stored_at=now + 30)
    assert (admitted.submitted_by, admitted.token) == ("op-1", None)
    # Every redelivery of the same task passes again; another task with it does not.
    assert admission.check(task, stored_at=now + 30).submitted_by == "op-1"
    other, _ = make_task("echo", {"n": 2}, task_id="t2", token=token)
    with pytest.raises(ContractError) as replayed:
        admission.check(other, stored_at=now + 30)
    assert replayed.value.code is ErrorCode.TOKEN_REPLAYED
    # Stored after it expired: refused, however soon it is taken.
    late, _ = make_task("echo", task_id="t3", token=mint.mint("op-1", ["tasks:submit"], ttl=60))
    with pytest.raises(ContractError) as expired:
        admission.check(late, stored_at=now + 3600)
    assert expired.value.code is ErrorCode.TOKEN_EXPIRED


def test_without_require_an_untokened_task_passes_but_a_bad_token_does_not(
    pki: FabricPki,
) -> None:
    admission = Admission.from_files(pki.dir / "signing.pub", require_token=False)
    plain, _ = make_task("echo", task_id="p1", submitted_by="sdk")
    assert admission.check(plain, stored_at=time.time()) == plain
    scoped, _ = make_task("echo", task_id="p2", token=issuer(pki).mint("op-1", ["read"]))
    with pytest.raises(ContractError) as refused:
        admission.check(scoped, stored_at=time.time())
    assert refused.value.code is ErrorCode.TOKEN_SCOPE


def test_an_exec_task_needs_the_right_to_run_commands(pki: FabricPki) -> None:
    # exec starts a process on a node: queueing work is not enough for that.
    admission = Admission.from_files(pki.dir / "signing.pub")
    mint = issuer(pki)
    submit_only, _ = make_task(
        "exec", {"argv": ["true"]}, task_id="x1", token=mint.mint("op-1", ["tasks:submit"])
    )
    with pytest.raises(ContractError) as refused:
        admission.check(submit_only, stored_at=time.time())
    assert refused.value.code is ErrorCode.TOKEN_SCOPE
    assert "agents:run" in refused.value.message
    both, _ = make_task(
        "exec", {"argv": ["true"]}, task_id="x2", token=mint.mint("op-1", list(scopes_for("exec")))
    )
    assert admission.check(both, stored_at=time.time()).submitted_by == "op-1"
    # Other types still need only the submit scope.
    assert scopes_for("summarize") == ("tasks:submit",)


# --- the CLI ---------------------------------------------------------------------------


async def cli(rig: TaskRig, *args: str, token_key: bool = True) -> tuple[int, str, str]:
    op = rig.pki["op-1"]
    env = {
        **os.environ,
        "FABRIC_NATS_URL": rig.server.url,
        "FABRIC_CA": str(rig.pki.ca),
        "FABRIC_CERT": str(op.cert),
        "FABRIC_KEY": str(op.key),
    }
    env.pop("FABRIC_TOKEN_KEY", None)
    if token_key:
        env["FABRIC_TOKEN_KEY"] = str(rig.pki.dir / "signing.key")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabric", "task", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_submits_with_its_own_token_and_shows_a_refusal(
    rig: TaskRig, controller: Controller
) -> None:
    (code, _, err), (refused_code, _, refused_err) = await asyncio.gather(
        cli(rig, "submit", "nobody", "--id", "cli-ok"),
        cli(rig, "submit", "nobody", "--id", "cli-bare", "--wait", "--timeout", "20",
            token_key=False),
    )  # fmt: skip
    assert code == 0, err
    assert refused_code == 1
    assert "task cli-bare was refused (token_missing)" in refused_err

    async def waiting() -> dict[str, object] | None:
        code, out, _ = await cli(rig, "get", "cli-ok", "--json")
        record = json.loads(out) if code == 0 else None
        return record if record and record["waiting"] else None

    record = None
    async with asyncio.timeout(15):
        while (record := await waiting()) is None:
            pass  # each round is a CLI run: the poll needs no pause of its own
    assert (record["state"], record["submitted_by"]) == ("queued", "op-1")
    code, out, _ = await cli(rig, "get", "cli-bare")
    assert code == 0
    assert "State:       refused" in out.splitlines()
    assert "Error:       token_missing: a task needs a token with scope tasks:submit" in out
