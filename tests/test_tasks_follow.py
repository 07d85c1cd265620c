"""An operator following a task (``TaskClient.wait``, what ``fabric task submit
--wait`` does) sees it finish however much its record changed meanwhile.

The watch is a JetStream push consumer with flow control: after a few MB the
server stops sending until the client answers on ``$JS.FC.KV_fabric_tasks.>``.
An operator without that publish right never could (a permissions violation,
reported only to its error callback), so a task with many progress reports or
a large result left ``--wait`` stalled on an old version of the record until
its timeout, although the task had succeeded. Found while reading the records
of the 10,000-task chaos burst as an operator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from natsfixtures import Clients, ErrorLog, FabricPki

from fabric.nats_server import NatsServer
from fabric.tasks.client import TaskClient, make_task
from fabric.tasks.records import (
    encode_record,
    new_record,
    started,
    succeeded,
    with_progress,
)
from fabric.tasks.stream import QueueSettings, ensure_task_state
from schemas.common import utc_now
from schemas.task import TaskOutcome, TaskResult

UPDATES = 1000
MESSAGE = "x" * 4000
"""4 MB of record versions in all: well past the flow-control window."""


@pytest.fixture
async def clients(pki: FabricPki, tmp_path: Path) -> AsyncIterator[Clients]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    clients = Clients(pki, default_urls=server.url)
    try:
        yield clients
    finally:
        await clients.aclose()
        await server.stop()


async def test_wait_follows_a_record_through_megabytes_of_progress(clients: Clients) -> None:
    ctl = await clients("ctl-1")
    kv = await ensure_task_state(ctl, ctl.jetstream(), QueueSettings())
    task, _ = make_task("echo", {}, task_id="chatty")
    record = started(new_record(task, "ctl-1"), "w-0", "n1", "ctl-1")
    await kv.put(task.id, encode_record(record))

    errors = ErrorLog()
    op = await clients("op-1", error_cb=errors)
    follow = asyncio.create_task(TaskClient(op).wait(task.id, within=30))
    for i in range(UPDATES):
        record = with_progress(record, i / UPDATES, MESSAGE)
        await kv.put(task.id, encode_record(record))
    now = utc_now()
    result = TaskResult(
        task_id=task.id,
        agent_id="w-0",
        attempt=1,
        outcome=TaskOutcome.SUCCEEDED,
        result={"ok": True},
        started_at=now,
        finished_at=now,
    )
    await kv.put(task.id, encode_record(succeeded(record, result)))

    final = await follow
    assert final.result == {"ok": True}
    assert not errors.violations, errors.violations[:1]
