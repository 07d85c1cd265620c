"""Tasks through the whole stack: a real controller (its own dispatcher, its
registry view), a real ``fabric-node`` process and worker agents it runs
from a deployment whose spec declares ``capabilities: [echo]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fleetfixtures import Fleet, controller_config, running
from nats.aio.client import Client
from natsfixtures import Clients, FabricPki
from workers.rig import LEDGER_WORKER, Events, TaskRig, fast_settings

from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tasks.records import TaskState
from fabric.tokens import TokenIssuer
from schemas import subjects
from schemas.api import ApiResult
from schemas.codec import decode, encode
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ErrorReply


class WorkerFleet(Fleet):
    """Node agents that hand their agents the worker identity ``work-1``."""

    def start(self, node_id: str, url: str | None = None, **labels: str) -> None:
        worker = self.pki["work-1"]
        env = {
            **os.environ,
            "FABRIC_NATS_URL": url or self.server.url,
            "FABRIC_CA": str(self.pki.ca),
            "FABRIC_CERT": str(self.pki[node_id].cert),
            "FABRIC_KEY": str(self.pki[node_id].key),
        }
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(self.base / node_id),
            "--token-key", str(self.pki.dir / "signing.pub"),
            "--heartbeat-interval", "0.5",
            "--metrics-interval", "0.5",
            "--worker-cert", str(worker.cert),
            "--worker-key", str(worker.key),
        ]  # fmt: skip
        with (self.base / f"{node_id}.log").open("ab") as log:
            self.procs[node_id] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)


@pytest.fixture
async def stack(pki: FabricPki, tmp_path: Path) -> AsyncIterator[tuple[TaskRig, WorkerFleet]]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = TaskRig(pki, server, tmp_path, Clients(pki, default_urls=server.url))
    fleet = WorkerFleet(pki, server, tmp_path)
    ctl = Controller(await rig.clients("ctl-1"), controller_config(pki, "ctl-1"))
    ctl.task_settings = fast_settings(ack_wait=3.0)  # type: ignore[attr-defined]
    try:
        async with running(ctl):
            fleet.start("n1")
            yield rig, fleet
            await fleet.stop_all()
    finally:
        await fleet.stop_all()
        await rig.aclose()
        await server.stop()


async def api(op: Client, method: str, body: dict[str, Any], pki: FabricPki) -> ApiResult:
    issuer = TokenIssuer.from_file(pki.dir / "signing.key", "tasks-test")
    body = {**body, "token": issuer.mint("op-1", ["agents:run"])}
    msg = await op.request(subjects.api(method), json.dumps(body).encode(), timeout=5)
    reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
    assert isinstance(reply, ApiResult), reply
    return reply


async def node_ready(op: Client, node_id: str, within: float = 15) -> None:
    ask = encode(DiscoverRequest(what="nodes", state="ready"))
    async with asyncio.timeout(within):
        while True:
            msg = await op.request(subjects.DISCOVER, ask, timeout=5)
            if node_id in {n.info.node_id for n in decode(msg.data, DiscoverReply).nodes}:
                return
            await asyncio.sleep(0.1)  # wait-ok: polling discovery under a deadline


def worker_pid(agent_id: str, ledger: Path) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        mine = str(LEDGER_WORKER) in cmdline and str(ledger) in cmdline
        if mine and proc.environ().get("FABRIC_AGENT_ID") == agent_id:
            return int(proc.pid)
    raise AssertionError(f"no process for agent {agent_id}")


async def test_a_task_waits_for_a_capable_agent_then_survives_its_kill_9(
    stack: tuple[TaskRig, WorkerFleet], pki: FabricPki
) -> None:
    rig, _fleet = stack
    tasks = await rig.tasks()
    progress: Events = await rig.subscribe_events(tasks.nc, "events.task.progress")
    await node_ready(tasks.nc, "n1")

    first = await tasks.submit("echo", {"n": 1})
    seen = await rig.record_until(tasks.nc, first.task.id, lambda r: bool(r.waiting))
    assert seen[-1].waiting == "no running agent serves 'echo'"
    spec = {
        "name": "echo-w",
        "argv": [sys.executable, str(LEDGER_WORKER), str(rig.ledger), "echo"],
        "capabilities": ["echo"],
        "start_seconds": 0,
        "stop_timeout": 3,
    }
    await api(tasks.nc, "create", {"deployment": {"spec": spec, "replicas": 2}}, pki)
    record = await tasks.wait(first.task.id, within=20)
    assert record.state is TaskState.SUCCEEDED
    assert record.agent_id in ("echo-w-0", "echo-w-1") and record.node_id == "n1"

    long = await tasks.submit("echo", {"sleep": 2})
    started = await progress.wait_for(lambda e: e["subject"] == long.task.id)
    victim = started["data"]["agent_id"]
    psutil.Process(worker_pid(victim, rig.ledger)).kill()
    record = await tasks.wait(long.task.id, within=20)

    assert record.state is TaskState.SUCCEEDED and record.attempts == 2
    # Seen through the registry (the node reported the exit) or, when the
    # worker's keepalives stop first on a loaded machine, as silence; both
    # come well before the ack wait, and either way the loss costs one attempt.
    assert record.error in (f"agent {victim} stopped running it", f"agent {victim} went silent")
    runs = [(e["agent"], e["attempt"]) for e in rig.entries("start") if e["task"] == long.task.id]
    assert runs[0] == (victim, 1) and len(runs) == 2
    assert [e["task"] for e in rig.entries("done")].count(long.task.id) == 1
