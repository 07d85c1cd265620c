"""High availability on a real 3-server cluster.

* Three ``fabric controller run`` processes share the cluster; the leader is
  SIGKILLed and a standby leads within the lease TTL plus one poll, then
  carries on reconciling (a deployment created after the takeover is placed).
* One NATS server of the three is SIGKILLed under a leading controller: the
  controller reconnects to another, and its KV writes and events still land.

State is R3 here: the controllers pick three replicas on a cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from fleetfixtures import (
    ControllerProcs,
    FakeNode,
    beating,
    controller_config,
    create,
    running,
    until,
)
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from natsfixtures import Clients, FabricPki, through_election

from fabric.controller.lease import LEASE_KEY, LeaseValue
from fabric.controller.service import Controller
from fabric.controller.streams import (
    AGENTS_BUCKET,
    EVENTS_STREAM,
    LEASE_BUCKET,
    NODES_BUCKET,
    StreamSettings,
    ensure_state,
)
from fabric.nats_server import NatsCluster
from fabric.tokens import TokenIssuer, TokenVerifier

TTL = 1.0
POLL = TTL / 3


class Events:
    """Every event seen on a core subscription, with the loop time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((asyncio.get_running_loop().time(), json.loads(msg.data)))

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.seen if e["type"] == f"io.agent-fabric.{kind}"]

    def leaders(self) -> list[str]:
        return [e["data"]["leader"] for _, e in self.of("controller.leader")]


async def holder(admin: Client) -> str | None:
    kv = await admin.jetstream().key_value(LEASE_BUCKET)
    try:
        entry = await kv.get(LEASE_KEY)
    except Exception:
        return None
    if not entry.value:
        return None
    return msgspec.json.decode(entry.value, type=LeaseValue).holder


async def controllers_up(viewer: Client, names: Sequence[str], within: float) -> None:
    """Wait until every named controller answers ``$SRV.PING`` (scatter-gather)."""
    seen: set[str] = set()

    async def on_pong(msg: Msg) -> None:
        seen.add(json.loads(msg.data)["metadata"]["controller"])

    inbox = viewer.new_inbox()
    sub = await viewer.subscribe(inbox, cb=on_pong)
    try:
        async with asyncio.timeout(within):
            while not set(names) <= seen:
                await viewer.publish("$SRV.PING.fabric-controller", b"", reply=inbox)
                await asyncio.sleep(0.2)  # wait-ok: re-ping until every process answers
    finally:
        await sub.unsubscribe()


async def test_kill_9_the_leader_then_a_standby_leads_and_reconciles(
    nats_cluster: NatsCluster, nats_clients: Clients, pki: FabricPki, tmp_path: Path
) -> None:
    urls = nats_cluster.urls
    admin = await nats_clients("ctl-1", urls)
    op = await nats_clients("op-1", urls)
    events = Events()
    await op.subscribe("events.>", cb=events.on_msg)
    procs = ControllerProcs(pki, tmp_path)
    names = ("ctl-a", "ctl-b", "ctl-c")
    issuer = TokenIssuer.from_file(pki.dir / "signing.key", "alice")
    verifier = TokenVerifier.from_files(pki.dir / "signing.pub")
    try:
        for name in names:
            procs.start(name, urls, lease_ttl=TTL)
        await controllers_up(op, names, within=30)
        await until(lambda: bool(events.leaders()), within=10)

        # On a cluster, every controller made its state with three replicas.
        js = admin.jetstream()
        assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 3
        for bucket in (NODES_BUCKET, AGENTS_BUCKET, LEASE_BUCKET):
            assert (await js.stream_info(f"KV_{bucket}")).config.num_replicas == 3

        n1 = FakeNode(await nats_clients("n1", urls), "n1", verifier)
        async with beating(n1):
            await create(op, issuer, "before")
            await n1.wait(lambda: "before" in n1.agents, within=10)
            leader = await holder(admin)
            assert leader in names
            assert set(n1.senders) == {leader}

            announced = len(events.leaders())
            procs.kill(leader)
            killed_at = asyncio.get_running_loop().time()
            await until(lambda: len(events.leaders()) > announced, within=TTL * 6)
            took, event = events.of("controller.leader")[-1]
            successor = event["data"]["leader"]
            assert successor != leader
            assert successor in names
            # TTL + one poll, plus slack for the server's expiry timer and the event.
            assert took - killed_at <= TTL + POLL + 1.0, took - killed_at

            # Reconciliation goes on under the new leader.
            await create(op, issuer, "after")
            await n1.wait(lambda: "after" in n1.agents, within=10)
            assert n1.senders[-1] == successor
            assert "before" in n1.agents
    finally:
        await procs.stop_all()


async def test_a_controller_survives_losing_its_nats_server(
    nats_cluster: NatsCluster, nats_clients: Clients, pki: FabricPki
) -> None:
    # The hardest server to lose: the one leading the deployments bucket's
    # stream (its consumers live there too). The controller connects to it.
    admin = await nats_clients("ctl-1", nats_cluster.urls)
    await ensure_state(admin, admin.jetstream(), StreamSettings(lease_ttl=TTL))
    info = await admin.jetstream().stream_info(f"KV_{AGENTS_BUCKET}")
    assert info.cluster is not None
    first = next(s for s in nats_cluster.servers if s.settings.server_name == info.cluster.leader)
    second, third = (s for s in nats_cluster.servers if s is not first)
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    # The controller sits on the first server; the node and the operator on the third.
    nc = await nats_clients(
        "ctl-1",
        [first.url, second.url, third.url],
        dont_randomize=True,
        reconnected_cb=on_reconnect,
    )
    ctl = Controller(nc, controller_config(pki, "ctl-s", lease_ttl=TTL))
    op = await nats_clients("op-1", [third.url, second.url])
    issuer = TokenIssuer.from_file(pki.dir / "signing.key", "alice")
    verifier = TokenVerifier.from_files(pki.dir / "signing.pub")
    n2 = FakeNode(await nats_clients("n2", [third.url, second.url]), "n2", verifier)
    try:
        async with running(ctl):
            await until(lambda: ctl.lease is not None and ctl.lease.valid(), within=10)
            async with beating(n2):
                await create(op, issuer, "steady")
                await n2.wait(lambda: "steady" in n2.agents, within=10)

                await first.kill()
                async with asyncio.timeout(10):
                    await reconnected.wait()
                assert nc.connected_url is not None
                assert nc.connected_url.port != first.settings.port

                # After the loss: an API write, the leader's record write and its
                # command, and the events all go through the two servers left.
                await create(op, issuer, "later")
                await n2.wait(lambda: "later" in n2.agents, within=30)
                mirror = ctl.deployments
                assert mirror is not None
                await until(
                    lambda: [p.node_id for p in mirror.items["later"][0].replicas] == ["n2"],
                    within=10,
                )
                stored = await _last_event(op.jetstream(), "events.deployment.created")
                assert stored.data is not None
                assert json.loads(stored.data)["subject"] == "later"
    finally:
        if not first.running:
            await first.start()
            await nats_cluster.wait_jetstream()


async def _last_event(js: JetStreamContext, subject: str) -> Any:
    """The last event on ``subject``, read through the lost server's elections
    (CI saw the first ask time out once)."""
    return await through_election(lambda: js.get_last_msg(EVENTS_STREAM, subject))
