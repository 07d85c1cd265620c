"""`fabric task submit|get` as a user runs them: a subprocess against a real
server, a dispatcher and a worker process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from natsfixtures import FabricPki
from workers.rig import TaskRig, task_rig

from schemas.task import MAX_TASK_PAYLOAD_BYTES


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        await rig.dispatcher()
        await rig.worker("wa", "echo")
        yield rig


async def fabric(rig: TaskRig, *args: str) -> tuple[int, str, str]:
    op = rig.pki["op-1"]
    env = {
        **os.environ,
        "FABRIC_NATS_URL": rig.server.url,
        "FABRIC_CA": str(rig.pki.ca),
        "FABRIC_CERT": str(op.cert),
        "FABRIC_KEY": str(op.key),
        "FABRIC_TOKEN_KEY": str(rig.pki.dir / "signing.key"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabric", "task", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_wait_prints_the_result_and_get_shows_the_record(rig: TaskRig) -> None:
    code, out, err = await fabric(
        rig, "submit", "echo", "--data", '{"n": 5}', "--id", "cli-1", "--wait", "--timeout", "20"
    )
    assert code == 0, err
    assert out.splitlines()[0] == "submitted cli-1 (echo, queue position 1)"
    assert json.loads("\n".join(out.splitlines()[1:])) == {"echo": {"n": 5}, "agent": "wa"}

    code, out, err = await fabric(rig, "submit", "echo", "--data", '{"n": 6}', "--id", "cli-1")
    assert code == 0, err
    assert out.strip() == "task cli-1 was already submitted: stored once, it runs once"

    code, out, err = await fabric(rig, "get", "cli-1", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert (record["state"], record["attempts"], record["agent_id"]) == ("succeeded", 1, "wa")
    assert record["submitted_by"] == "op-1"
    code, out, _ = await fabric(rig, "get", "cli-1")
    assert "State:       succeeded" in out.splitlines()
    assert len(rig.entries("start")) == 1


async def test_a_dead_task_exits_1_with_its_error(rig: TaskRig) -> None:
    code, _, err = await fabric(
        rig, "submit", "echo", "--data", '{"fail": "nope"}', "--max-attempts", "1", "--wait"
    )
    assert code == 1
    assert "is dead after 1 attempt(s): RuntimeError: nope" in err


async def test_bad_input_is_refused_with_its_code(rig: TaskRig, tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"blob": "x" * MAX_TASK_PAYLOAD_BYTES}))
    cases = [
        (["submit", "echo", "--id", "Not-Valid"], "invalid_id"),
        (["submit", "no.such"], "invalid_id"),
        (["submit", "echo", "--data", f"@{big}"], "payload_too_large"),
        (["submit", "echo", "--priority", "11"], "invalid_payload"),
        (["submit", "echo", "--data", "{not json"], "--data is not JSON"),
        (["get", "Bad Id"], "invalid_id"),
    ]
    results = await asyncio.gather(*(fabric(rig, *args) for args, _ in cases))
    for (args, expected), (code, _, err) in zip(cases, results, strict=True):
        assert (code, expected in err) == (2, True), (args, err)
    code, _, err = await fabric(rig, "get", "never-submitted")
    assert code == 1 and "no record of task 'never-submitted'" in err
    assert rig.entries() == []
