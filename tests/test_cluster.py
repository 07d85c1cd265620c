"""A 3-server cluster over TLS routes: R3 streams survive losing a server, clients follow."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from natsfixtures import Clients, through_election

from fabric.connect import js_publish
from fabric.nats_server import NatsCluster


async def test_routes_carry_messages_between_servers(
    nats_cluster: NatsCluster, nats_clients: Clients
) -> None:
    first = await nats_clients("ctl-1", nats_cluster[0].url)
    last = await nats_clients("view-1", nats_cluster[2].url)
    sub = await last.subscribe("events.node.lost")
    await last.flush()
    # Interest crosses the routes asynchronously: publish until it arrives.
    async with asyncio.timeout(10):
        while True:
            await first.publish("events.node.lost", b"n9")
            try:
                msg = await sub.next_msg(timeout=0.2)
                break
            except TimeoutError:
                continue
    assert msg.data == b"n9"


async def test_publish_retries_no_response_with_the_same_msg_id(
    nats_cluster: NatsCluster, nats_clients: Clients
) -> None:
    nc = await nats_clients("ctl-1", nats_cluster.urls)
    js = nc.jetstream()
    retried = asyncio.Event()
    errors: list[Exception] = []

    def on_retry(exc: Exception, attempt: int) -> None:
        errors.append(exc)
        retried.set()

    # No stream yet: JetStream answers "no response" until one exists.
    publish = asyncio.create_task(
        js_publish(
            js, "tasks.late.queue", b"1", msg_id="late-1", on_retry=on_retry, attempt_timeout=1
        )
    )
    try:
        async with asyncio.timeout(10):
            await retried.wait()
        await js.add_stream(name="LATE", subjects=["tasks.late.queue"], num_replicas=3)
        ack = await publish
    finally:
        publish.cancel()
    assert ack.stream == "LATE" and ack.seq == 1 and not ack.duplicate
    again = await js_publish(js, "tasks.late.queue", b"1", msg_id="late-1")
    assert again.duplicate and again.seq == ack.seq
    assert (await js.stream_info("LATE")).state.messages == 1
    assert errors


async def test_acknowledged_messages_survive_losing_the_stream_leader(
    nats_cluster: NatsCluster, nats_clients: Clients
) -> None:
    admin = await nats_clients("ctl-1", nats_cluster.urls)
    ajs = admin.jetstream()
    await ajs.add_stream(name="ORDERS", subjects=["events.order.>"], num_replicas=3)
    leader_name = (await ajs.stream_info("ORDERS")).cluster.leader
    leader = next(s for s in nats_cluster.servers if s.settings.server_name == leader_name)
    rest = [s.url for s in nats_cluster.servers if s is not leader]

    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    # Connected to the leader's server first, with the other two as fallbacks.
    nc = await nats_clients(
        "ctl-1", [leader.url, *rest], dont_randomize=True, reconnected_cb=on_reconnect
    )
    assert nc.connected_url is not None and nc.connected_url.port == leader.settings.port
    js = nc.jetstream()

    acked: dict[str, int] = {}

    async def publish(i: int) -> None:
        ack = await js_publish(
            js,
            f"events.order.o{i}",
            f"order-{i}".encode(),
            msg_id=f"order-{i}",
        )
        acked[f"order-{i}"] = ack.seq

    for i in range(100):
        await publish(i)

    await leader.kill()
    try:
        async with asyncio.timeout(10):
            await reconnected.wait()
        assert nc.connected_url is not None and nc.connected_url.port != leader.settings.port
        # Through the election: js_publish retries with the same Nats-Msg-Id.
        for i in range(100, 150):
            await publish(i)

        info = await through_election(lambda: js.stream_info("ORDERS"))
        assert info.cluster is not None and info.cluster.leader != leader_name
        assert info.state.messages == len(acked) == 150

        # Read every message back: each acknowledged id exactly once.
        seen: list[str] = []
        sub = await _ordered_reader(js, "ORDERS", "events.order.>")
        async with asyncio.timeout(10):
            while len(seen) < len(acked):
                msg: Msg = await sub.next_msg(timeout=5)
                assert msg.headers is not None
                seen.append(msg.headers["Nats-Msg-Id"])
        await sub.unsubscribe()
        assert sorted(seen) == sorted(acked)
        assert len(set(acked.values())) == len(acked)  # one sequence per id
    finally:
        # Leave the module's cluster whole for any later test.
        await leader.start()


async def _ordered_reader(js: JetStreamContext, stream: str, subject: str) -> Any:
    """An ordered consumer, asked for through the killed server's elections."""
    return await through_election(
        lambda: js.subscribe(subject, stream=stream, ordered_consumer=True)
    )


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_server_has_its_own_store_and_tls_routes(
    nats_cluster: NatsCluster, index: int
) -> None:
    server = nats_cluster[index]
    conf = server.config_path.read_text()
    assert str(server.settings.store_dir) in conf
    cluster = conf[conf.index("cluster {") :]
    assert "verify_and_map: true" in cluster
    assert conf.count("nats-route://") == len(nats_cluster.servers)
    assert len({s.settings.store_dir for s in nats_cluster.servers}) == len(nats_cluster.servers)
