"""A slow consumer (issue 8): a dashboard that never reads slows no one else.

A viewer speaking raw NATS protocol subscribes to everything a dashboard
follows (``agents.*.status``, ``agents.*.logs``, ``nodes.*.heartbeat``,
``events.>``) and then never reads its socket, while a real ``fabric-node``
publishes the logs of a chatty agent (a few hundred KB/s) and a real
controller (``fabric controller run``) follows the node. Measured from a
well-behaved viewer and operator: the node's heartbeats keep their period,
node commands and controller API calls are answered promptly, the controller
never thinks the node lost, and the server cuts the slow consumer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from agents.harness import until
from chaosnode import Beats, Events, NodeProc, Prober, RawSubscriber, command, issuer
from fleetfixtures import ControllerProcs
from natsfixtures import Clients, FabricPki

from fabric.nats_server import NatsServer
from schemas import subjects
from schemas.agent import AgentSpec, LogSpec
from schemas.api import ApiResult, ListDeployments
from schemas.codec import decode
from schemas.command import ListAgents, PlaceAgent
from schemas.errors import ErrorReply

CONTROLLER_HEARTBEAT = 0.5  # `fabric controller run` default; the node adopts it
MAX_GAP = 3 * CONTROLLER_HEARTBEAT
MAX_REPLY = 1.0
# nats-server's default write_deadline is 10 s, plus the time to fill the buffers
# (the server's socket buffer takes a few MB).
CUT_WITHIN = 20.0
# 200-byte lines, published by the node on agents.<id>.logs: ~1.3 MB/s each
# (the node's cap for one agent's published logs), ~2.5 MB/s from the two.
CHATTY = (
    "import sys, time\n"
    "line = 'y' * 199 + '\\n'\n"
    "while True:\n"
    "    sys.stdout.write(line * 200)\n"
    "    sys.stdout.flush()\n"
    "    time.sleep(0.02)\n"
)
CHATTY_AGENTS = ("chatty-1", "chatty-2")
VIEWER_SUBJECTS = ("agents.*.status", "agents.*.logs", "nodes.*.heartbeat", "events.>")


@pytest.fixture
async def ops(pki: FabricPki, nats_server: NatsServer) -> AsyncIterator[Clients]:
    clients = Clients(pki, default_urls=nats_server.url)
    try:
        yield clients
    finally:
        await clients.aclose()


def slow_consumer(pki: FabricPki, server: NatsServer) -> RawSubscriber:
    url = urlparse(server.url)
    assert url.hostname is not None and url.port is not None
    ident = pki["view-1"]
    raw = RawSubscriber(url.hostname, url.port, pki.ca, ident.cert, ident.key)
    raw.subscribe(VIEWER_SUBJECTS)
    return raw


async def test_a_dashboard_that_never_reads_slows_no_one(
    pki: FabricPki, nats_server: NatsServer, ops: Clients, tmp_path: Path
) -> None:
    iss = issuer(pki)
    controllers = ControllerProcs(pki, tmp_path)
    controllers.start("ctl-chaos", [nats_server.url])
    node = NodeProc(pki, nats_server.url, tmp_path / "state", tmp_path / "node.log", heartbeat=0.3)
    raw: RawSubscriber | None = None
    probes: list[Prober] = []
    try:
        op = await ops("op-1")
        viewer = await ops("view-1")
        beats, events = Beats(), Events()
        await beats.start(viewer, "n1")
        await events.start(viewer)

        def api_list() -> ListDeployments:
            return ListDeployments(token=iss.mint("op-1", ["read"]))

        # The node has registered with the controller.
        await until(lambda: len(beats.at) >= 3, within=15)

        await until(lambda: "registered with a controller" in node.log(), within=15)

        for name in CHATTY_AGENTS:
            chatty = AgentSpec(
                name=name,
                argv=[sys.executable, "-c", CHATTY],
                start_seconds=0,
                logs=LogSpec(publish=True, max_bytes=4 << 20, backups=1),
            )
            placed = await command(
                op,
                subjects.node_commands("n1"),
                PlaceAgent(spec=chatty, token=iss.mint("op-1", ["agents:run"])),
            )
            assert not isinstance(placed, ErrorReply), placed

        raw = slow_consumer(pki, nats_server)
        loop = asyncio.get_running_loop()
        started = loop.time()
        mark = beats.mark()
        node_probe = Prober(
            op, subjects.node_commands("n1"), lambda: ListAgents(token=iss.mint("op-1", ["read"]))
        )
        api_probe = Prober(op, subjects.api("list"), api_list, decoder=decode_api)
        probes = [node_probe.start(), api_probe.start()]

        # Watched in the server's log: reading the socket would make it a reader.
        await until(lambda: cut_line(nats_server) is not None, within=CUT_WITHIN, step=0.1)
        cut_after = loop.time() - started
        # Reading now drains what was queued for it, then meets the server's EOF.
        await until(raw.cut_by_server, within=5, step=0.05)
        # Everyone else carries on after the cut.
        after_cut = len(node_probe.latencies)
        await until(lambda: len(node_probe.latencies) >= after_cut + 5, within=5)

        gap = beats.max_gap(mark)
        print(
            f"slow consumer cut after {cut_after:.1f}s; heartbeat max gap {gap:.3f}s; "
            f"node command worst {node_probe.worst * 1000:.1f} ms "
            f"({len(node_probe.latencies)}); controller API worst "
            f"{api_probe.worst * 1000:.1f} ms ({len(api_probe.latencies)})"
        )
        assert gap < MAX_GAP, f"heartbeat gap {gap:.3f}s"
        assert not node_probe.failures and not api_probe.failures, (
            node_probe.failures,
            api_probe.failures,
        )
        assert node_probe.worst < MAX_REPLY and api_probe.worst < MAX_REPLY
        assert not events.of("node.lost", "n1"), "the controller lost the node"
        assert node.alive() and controllers.procs["ctl-chaos"].poll() is None
    finally:
        for probe in probes:
            await probe.stop()
        if raw is not None:
            raw.close()
        code = await node.stop()
        await controllers.stop_all()
    assert code == 0, node.log()[-3000:]


def cut_line(server: NatsServer) -> str | None:
    """The server's log line saying it cut the never-reading client, if any."""
    for line in server.log_text().splitlines():
        if "Slow Consumer Detected" in line and '"never-reads"' in line:
            return line
    return None


def decode_api(data: bytes) -> ApiResult | ErrorReply:
    return decode(data, ApiResult | ErrorReply)  # type: ignore[arg-type]
