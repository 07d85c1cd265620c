"""The controller's Prometheus endpoint: a real `fabric controller run --metrics-port 0`
and a real node agent on the module's nats-server; values are scraped over HTTP
and must move as the fleet does."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
from fleetfixtures import Fleet
from natsfixtures import FabricPki
from prometheus_client.parser import text_string_to_metric_families

from fabric.client import FabricClient, open_client
from fabric.env import FabricEnv
from fabric.nats_server import NatsServer
from fabric.tasks.client import TaskClient
from schemas import subjects
from schemas.agent import AgentSpec
from schemas.api import CreateDeployment, Deployment
from schemas.command import SignalAgent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_PORT_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
_SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def eventually(what: str, probe: Callable[[], object], within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)  # wait-ok: polled condition under a deadline


class Scraper:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.last: Samples = {}
        self.content_type = ""

    async def __call__(self) -> Samples:
        async with self.http.get(self.url) as resp:
            assert resp.status == 200
            self.content_type = resp.headers["Content-Type"]
            self.last = parse(await resp.text())
        return self.last


def start_controller(pki: FabricPki, server: NatsServer, log_path: Path) -> subprocess.Popen[bytes]:
    ident = pki["ctl-1"]
    argv = [
        sys.executable, "-m", "fabric", "controller", "run",
        "--name", "ctl-1",
        "--url", server.url,
        "--ca", str(pki.ca),
        "--cert", str(ident.cert),
        "--key", str(ident.key),
        "--pki", str(pki.dir),
        "--lease-ttl", "1",
        "--metrics-port", "0",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def controller_with_metrics(
    pki: FabricPki, server: NatsServer, base: Path
) -> AsyncIterator[int]:
    log_path = base / "controller.log"
    proc = start_controller(pki, server, log_path)
    try:
        found: list[int] = []

        def port() -> bool:
            assert proc.poll() is None, log_path.read_text()
            match = _PORT_LINE.search(log_path.read_text(errors="replace"))
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        await eventually("the metrics port in the controller's log", port)
        yield found[0]
    finally:
        stop(proc)


def operator_env(pki: FabricPki, server: NatsServer) -> FabricEnv:
    op = pki["op-1"]
    return FabricEnv(
        url=server.url,
        ca=pki.ca,
        cert=op.cert,
        key=op.key,
        token_key=pki.dir / "signing.key",
        state_dir=None,
        source="test",
    )


@pytest.mark.timeout(90)
async def test_scrape_moves_with_the_fleet(
    pki: FabricPki, nats_server: NatsServer, tmp_path: Path
) -> None:
    fleet = Fleet(pki, nats_server, tmp_path)
    async with (
        controller_with_metrics(pki, nats_server, tmp_path) as port,
        aiohttp.ClientSession() as http,
        open_client(env=operator_env(pki, nats_server)) as client,
    ):
        scrape = Scraper(http, f"http://127.0.0.1:{port}/metrics")
        try:
            fleet.start("n1")
            await _fleet_moves(client, scrape, fleet)
        finally:
            await fleet.stop_all()


async def _fleet_moves(client: FabricClient, scrape: Scraper, fleet: Fleet) -> None:
    async def node_ready() -> bool:
        s = await scrape()
        return (
            value(s, "fabric_nodes", state="ready") == 1
            and value(s, "fabric_node_cpu_percent", node="n1") is not None
        )

    await eventually("n1 ready with metrics", node_ready)
    s = scrape.last
    assert scrape.content_type.startswith("text/plain")
    assert value(s, "fabric_controller_leader", controller="ctl-1") == 1
    assert value(s, "fabric_agents", state="running") == 0
    assert (value(s, "fabric_node_cpus", node="n1") or 0) > 0
    assert (value(s, "fabric_node_memory_bytes", node="n1") or 0) > 0
    assert 0 <= (value(s, "fabric_node_heartbeat_age_seconds", node="n1") or -1) < 5

    spec = {"name": "pm", "argv": _SLEEPER, "restart": {"policy": "always"}}
    deployment = Deployment(spec=msgspec.convert(spec, AgentSpec))
    await client.api("create", CreateDeployment(deployment=deployment))

    async def running() -> bool:
        s = await scrape()
        return (
            value(s, "fabric_agents", state="running") == 1
            and value(s, "fabric_agent_memory_rss_bytes", agent="pm", node="n1") is not None
        )

    await eventually("pm running in the metrics", running)
    s = scrape.last
    assert value(s, "fabric_api_calls_total", method="create") == 1
    before = value(s, "fabric_agent_restarts_total", agent="pm", node="n1")
    assert before == 0

    await client.command("pm", SignalAgent(signal="SIGKILL"))

    async def restarted() -> bool:
        s = await scrape()
        return (value(s, "fabric_agent_restarts_total", agent="pm", node="n1") or 0) > 0

    await eventually("pm's restart counted", restarted)

    # A task no agent serves waits in the queue: the backlog of its type shows it.
    # `fabric controller run` refuses untokened tasks: this one carries a submit token.
    tasks = TaskClient(client.nc, token=lambda: client.mint(["tasks:submit"]))
    await tasks.submit("pmnobody", {"n": 1})

    async def queued() -> bool:
        return value(await scrape(), "fabric_task_backlog", type="pmnobody") == 1

    await eventually("the task backlog", queued)

    # A malformed API request is refused and counted by its code.
    refused = value(scrape.last, "fabric_refused_messages_total", code="invalid_payload") or 0
    await client.nc.request(subjects.api("create"), b"{not json", timeout=5)

    async def counted() -> bool:
        s = await scrape()
        return (value(s, "fabric_refused_messages_total", code="invalid_payload") or 0) > refused

    await eventually("the refusal counted", counted)

    # A node that stops beating is declared lost: the failover counter moves.
    node = fleet.procs["n1"]
    node.send_signal(signal.SIGSTOP)
    try:

        async def lost() -> bool:
            s = await scrape()
            return (
                value(s, "fabric_nodes_lost_total") == 1
                and value(s, "fabric_nodes", state="lost") == 1
            )

        await eventually("n1 declared lost", lost)
    finally:
        node.send_signal(signal.SIGCONT)
