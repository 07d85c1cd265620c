"""A small real fleet: one controller, three `fabric-node` processes, real children.

Covers what only the whole stack shows: replicas spread over nodes, a node
agent killed with its children and its agents re-placed, a node frozen past
``node_timeout`` whose stale copy goes on resume, and a silent network cut
(through a cuttable TCP proxy) where an ``on_partition: stop`` singleton is
stopped by its own node before the controller re-places it. A sampler
watches every copy's pid throughout and the tests assert on what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from agents.harness import until
from fleetfixtures import CopySampler, Fleet
from nats.aio.client import Client
from natsfixtures import Clients, FabricPki, make_pki
from netproxy import CuttableProxy

from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer
from schemas import subjects
from schemas.api import ApiResult
from schemas.codec import decode, encode
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ErrorReply

NODE_TIMEOUT = 1.5
IDENTITIES = {
    "ctl-1": "controller",
    "n1": "node",
    "n2": "node",
    "n3": "node",
    "op-1": "operator",
    "view-1": "viewer",
}


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FabricPki:
    return make_pki(tmp_path_factory.mktemp("fleet-pki"), IDENTITIES)


@pytest.fixture
async def fleet_server(fleet_pki: FabricPki, tmp_path: Path) -> AsyncIterator[NatsServer]:
    # One server per test: the registry lives in its JetStream, and each test
    # wants a fleet with no deployments left over from another.
    server = NatsServer.local(fleet_pki.dir, tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def fleet(
    fleet_pki: FabricPki, fleet_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[Fleet, Clients, CopySampler]]:
    clients = Clients(fleet_pki, default_urls=fleet_server.url)
    config = ControllerConfig(
        name="ctl-1",
        signing_key=fleet_pki.dir / "signing.key",
        verify_keys=(fleet_pki.dir / "signing.pub",),
        node_timeout=NODE_TIMEOUT,
        lease_ttl=1.0,
        reconcile_interval=0.1,
        streams=StreamSettings(lease_ttl=1.0),
    )
    controller = Controller(await clients("ctl-1"), config)
    ctl_task = asyncio.create_task(controller.run())
    fleet = Fleet(fleet_pki, fleet_server, tmp_path)
    sampler = CopySampler()
    sampler_task = asyncio.create_task(sampler.run())
    try:
        async with asyncio.timeout(10):
            await controller.started.wait()
        yield fleet, clients, sampler
    finally:
        await fleet.stop_all()
        sampler_task.cancel()
        ctl_task.cancel()
        await asyncio.gather(sampler_task, ctl_task, return_exceptions=True)
        await clients.aclose()
        for pids in sampler.pids.values():
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


async def api(
    nc: Client, issuer: TokenIssuer, method: str, body: dict[str, Any], *scopes: str
) -> Any:
    body = {**body, "token": issuer.mint("op-1", list(scopes))}
    msg = await nc.request(subjects.api(method), json.dumps(body).encode(), timeout=5)
    reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
    assert isinstance(reply, ApiResult), reply
    return reply


async def where(nc: Client, issuer: TokenIssuer, name: str) -> dict[str, str | None]:
    reply = await api(nc, issuer, "get", {"name": name}, "read")
    return {r.agent_id: r.node_id for r in reply.deployments[0].replicas}


def running_copies(sampler: CopySampler) -> dict[str, list[int]]:
    return sampler.sample()


@pytest.fixture(scope="module")
def issuer(fleet_pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(fleet_pki.dir / "signing.key", "fleet-test")


async def test_spread_then_kill_9_a_node_with_its_children(
    fleet: tuple[Fleet, Clients, CopySampler], issuer: TokenIssuer
) -> None:
    nodes, clients, sampler = fleet
    for node_id in ("n1", "n2", "n3"):
        nodes.start(node_id)
    op = await clients("op-1")
    events: list[Any] = []

    async def on_event(msg: Any) -> None:
        events.append(json.loads(msg.data))

    await op.subscribe("events.>", cb=on_event)
    spec = {"name": "web", "argv": sampler.sleeper, "start_seconds": 0}
    await wait_ready(op, {"n1", "n2", "n3"})
    await api(op, issuer, "create", {"deployment": {"spec": spec, "replicas": 3}}, "agents:run")

    await until(lambda: len(running_copies(sampler)) == 3, within=20)
    placed = await where(op, issuer, "web")
    assert sorted(placed.values()) == ["n1", "n2", "n3"], "spread: one replica per node"

    victim_replica = next(a for a, n in placed.items() if n == "n1")
    victim_pid = running_copies(sampler)[victim_replica][0]
    node_proc = psutil.Process(nodes.procs["n1"].pid)
    children = node_proc.children(recursive=True)
    assert victim_pid in {c.pid for c in children}
    sampler.mark()
    for proc in [node_proc, *children]:
        proc.kill()
    nodes.procs["n1"].wait(timeout=10)

    def replaced() -> bool:
        pids = running_copies(sampler).get(victim_replica, [])
        return len(pids) == 1 and pids[0] != victim_pid

    await until(replaced, within=NODE_TIMEOUT + 10)
    now = await where(op, issuer, "web")
    assert now[victim_replica] in ("n2", "n3")
    assert max(sampler.since_mark.values()) == 1, "never two copies of one replica"
    await until(lambda: {"io.agent-fabric.node.lost", "io.agent-fabric.agent.replaced"}
                <= {e["type"] for e in events}, within=10)  # fmt: skip
    lost = next(e for e in events if e["type"] == "io.agent-fabric.node.lost")
    assert lost["subject"] == "n1"


async def ready_nodes(nc: Client) -> set[str]:
    ask = DiscoverRequest(what="nodes", state="ready")
    msg = await nc.request(subjects.DISCOVER, encode(ask), timeout=5)
    return {n.info.node_id for n in decode(msg.data, DiscoverReply).nodes}


async def wait_ready(nc: Client, wanted: set[str], within: float = 20) -> None:
    async with asyncio.timeout(within):
        while not wanted <= await ready_nodes(nc):  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # wait-ok: polling discovery under a deadline


async def samples_after(sampler: CopySampler, count: int) -> None:
    target = sampler.samples + count
    await until(lambda: sampler.samples >= target, within=30)


async def test_frozen_node_loses_its_copy_on_resume(
    fleet: tuple[Fleet, Clients, CopySampler], issuer: TokenIssuer
) -> None:
    nodes, clients, sampler = fleet
    op = await clients("op-1")
    nodes.start("n1")
    await wait_ready(op, {"n1"})
    spec = {"name": "kept", "argv": sampler.sleeper, "start_seconds": 0}
    await api(op, issuer, "create", {"deployment": {"spec": spec}}, "agents:run")
    await until(lambda: len(running_copies(sampler).get("kept", [])) == 1, within=20)
    stale_pid = running_copies(sampler)["kept"][0]
    nodes.start("n2")
    await wait_ready(op, {"n2"})

    frozen = nodes.procs["n1"].pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        # keep: the frozen node cannot stop its copy; the controller re-places it.
        await until(lambda: len(running_copies(sampler).get("kept", [])) == 2, within=20)
        assert (await where(op, issuer, "kept"))["kept"] == "n2"
    finally:
        os.kill(frozen, signal.SIGCONT)
    await until(lambda: stale_pid not in running_copies(sampler).get("kept", []), within=20)
    sampler.mark()
    await samples_after(sampler, 100)
    assert sampler.since_mark["kept"] == 1, "after the heal, one copy only"
    assert running_copies(sampler)["kept"] != [stale_pid]


async def test_cut_off_node_stops_its_singleton_before_it_is_replaced(
    fleet: tuple[Fleet, Clients, CopySampler], issuer: TokenIssuer
) -> None:
    nodes, clients, sampler = fleet
    op = await clients("op-1")
    proxy = CuttableProxy("127.0.0.1", nodes.server.settings.port)
    await proxy.start()
    try:
        nodes.start("n1", url=proxy.url, pool="a")
        await wait_ready(op, {"n1"})
        spec = {"name": "solo", "argv": sampler.sleeper, "start_seconds": 0, "on_partition": "stop"}
        deployment = {"spec": spec, "constraints": {"labels": {"pool": "a"}}}
        await api(op, issuer, "create", {"deployment": deployment}, "agents:run")
        await until(lambda: len(running_copies(sampler).get("solo", [])) == 1, within=20)
        first_pid = running_copies(sampler)["solo"][0]
        nodes.start("n2", pool="a")
        await wait_ready(op, {"n2"})

        sampler.mark()
        proxy.cut()

        def moved() -> bool:
            pids = running_copies(sampler).get("solo", [])
            return len(pids) == 1 and pids[0] != first_pid

        await until(moved, within=20)
        assert sampler.since_mark["solo"] == 1, "the singleton never ran twice"
        assert (await where(op, issuer, "solo"))["solo"] == "n2"

        proxy.heal()
        await wait_ready(op, {"n1", "n2"})
        await samples_after(sampler, 100)
        assert sampler.since_mark["solo"] == 1
        assert first_pid not in running_copies(sampler).get("solo", [])
    finally:
        proxy.heal()
        await nodes.stop_all()
        await proxy.close()
