"""A leaf-node edge site: linked to the hub over mutual TLS, alive without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import make_pki

from fabric.connect import connect
from fabric.nats_config import LeafSettings, ServerSettings
from fabric.nats_server import NatsServer, free_port
from schemas import subjects


async def delivered(
    publisher: Client, received: asyncio.Queue[bytes], payload: bytes, within: float
) -> bool:
    """Publish ``payload`` until it shows up in ``received`` or ``within`` s pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            await publisher.publish(subjects.node_heartbeat("n1"), payload)
            await publisher.flush(timeout=1)
            if await asyncio.wait_for(received.get(), 0.2) == payload:
                return True
        except (TimeoutError, nats.errors.Error):
            continue
    return False


async def test_edge_keeps_serving_while_its_uplink_is_down(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", {"op-1": "operator", "view-1": "viewer", "n1": "node"})
    leaf_port = free_port()

    def settings(name: str, leaf: LeafSettings) -> ServerSettings:
        return ServerSettings(
            server_name=name,
            pki_dir=pki.dir,
            store_dir=tmp_path / name / "js",
            port=free_port(),
            leaf=leaf,
        )

    hub = NatsServer(settings("hub", LeafSettings(listen_port=leaf_port)), tmp_path / "hub")
    edge = NatsServer(
        settings("edge", LeafSettings(remotes=(f"127.0.0.1:{leaf_port}",), domain="edge")),
        tmp_path / "edge",
    )
    await hub.start()
    await edge.start()
    assert 'domain: "edge"' in edge.config_path.read_text()
    try:

        async def client(server: NatsServer, name: str) -> Client:
            ident = pki[name]
            return await connect(server.url, ca=pki.ca, cert=ident.cert, key=ident.key)

        on_hub = await client(hub, "view-1")
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            await got.put(msg.data)

        await on_hub.subscribe(subjects.node_heartbeat("n1"), cb=collect)
        await on_hub.flush()
        node = await client(edge, "n1")

        # The leaf link needs a moment after start.
        assert await delivered(node, got, b"beat", within=15), f"edge log:\n{edge.log_text()}"
        await on_hub.close()

        # The uplink goes: the edge's own clients and JetStream carry on.
        await hub.kill()
        local: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect_local(msg: Msg) -> None:
            await local.put(msg.data)

        viewer = await client(edge, "view-1")
        await viewer.subscribe(subjects.node_heartbeat("n1"), cb=collect_local)
        await viewer.flush()
        # Kept publishing: a client that was reconnecting when the hub went
        # still gets through once it is back on the edge.
        assert await delivered(node, local, b"alone", within=15), (
            f"node client connected={node.is_connected}; edge log:\n{edge.log_text()[-4000:]}"
        )
        op = await client(edge, "op-1")
        js = op.jetstream()
        await js.add_stream(name="EDGE_LOCAL", subjects=["tasks.*.queue"])
        ack = await js.publish(subjects.task_queue("edge-work"), b"{}")
        assert ack.stream == "EDGE_LOCAL"
        for nc in (viewer, op, node):
            await nc.close()
    finally:
        await edge.stop()
        await hub.stop()
