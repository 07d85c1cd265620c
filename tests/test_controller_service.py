"""The controller against a real nats-server: registration, discovery, API, failover.

Nodes here are plain NATS clients authenticated as nodes ``n1`` / ``n2`` that
answer place/remove commands and heartbeat what they "run": enough to drive
the controller through placement, node loss and the heal of a partition.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents.harness import until
from fleetfixtures import FakeNode, node_info, running
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import Clients, ErrorLog, FabricPki

from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.tokens import TokenIssuer, TokenVerifier
from schemas import subjects
from schemas.agent import AgentSpec
from schemas.api import ApiResult
from schemas.codec import decode, encode
from schemas.command import RemoveAgent
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ErrorCode, ErrorReply
from schemas.node import RegisterRequest

TIMEOUT = 1.5


@pytest.fixture
def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", "test-operator")


@pytest.fixture
def verifier(pki: FabricPki) -> TokenVerifier:
    return TokenVerifier.from_files(pki.dir / "signing.pub")


def config(pki: FabricPki, name: str = "ctl-1") -> ControllerConfig:
    return ControllerConfig(
        name=name,
        signing_key=pki.dir / "signing.key",
        verify_keys=(pki.dir / "signing.pub",),
        node_timeout=TIMEOUT,
        lease_ttl=1.0,
        reconcile_interval=0.1,
        streams=StreamSettings(lease_ttl=1.0),
    )


@pytest.fixture
async def controller(pki: FabricPki, connect_as: Clients) -> AsyncIterator[Controller]:
    ctl = Controller(await connect_as("ctl-1"), config(pki))
    async with running(ctl):
        await until(lambda: ctl.lease is not None and ctl.lease.valid())
        yield ctl


async def call(nc: Client, method: str, body: dict[str, Any]) -> ApiResult | ErrorReply:
    msg = await nc.request(subjects.api(method), json.dumps(body).encode(), timeout=3)
    return decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]


def deployment(name: str, replicas: int = 1, **constraints: Any) -> dict[str, Any]:
    return {
        "spec": {"name": name, "argv": ["sleep", "100"]},
        "replicas": replicas,
        "constraints": constraints,
    }


# --- registration and discovery ----------------------------------------------


async def test_registration_records_the_node_and_discover_finds_it(
    controller: Controller, connect_as: Clients, verifier: TokenVerifier
) -> None:
    node = FakeNode(await connect_as("n1"), "n1", verifier)
    reply = await node.register()
    assert reply.node_id == "n1"
    assert reply.node_timeout == TIMEOUT
    assert reply.heartbeat_interval == 0.5
    viewer = await connect_as("view-1")
    ask = DiscoverRequest(what="nodes", labels={}, capability="summarize", state="ready")
    msg = await viewer.request(subjects.DISCOVER, encode(ask), timeout=2)
    found = decode(msg.data, DiscoverReply)
    assert [n.info.node_id for n in found.nodes] == ["n1"]
    assert found.answered_by == "ctl-1"
    for miss in (
        DiscoverRequest(what="nodes", ids=["n2"]),
        DiscoverRequest(what="nodes", labels={"zone": "x"}),
        DiscoverRequest(what="nodes", state="lost"),
    ):
        msg = await viewer.request(subjects.DISCOVER, encode(miss), timeout=2)
        assert decode(msg.data, DiscoverReply).nodes == []


async def test_a_node_cannot_register_as_another(
    controller: Controller, connect_as: Clients
) -> None:
    errors = ErrorLog()
    nc = await connect_as("n1", error_cb=errors)
    # The server drops a publish outside the node's own subjects...
    req = encode(RegisterRequest(node=node_info("n2")))
    await nc.publish(subjects.node_register("n2"), req, reply="_INBOX.x")
    await errors.wait_for('permissions violation for publish to "nodes.n2.register"')
    # ...and the controller refuses a body naming another node on its own subject.
    msg = await nc.request(subjects.node_register("n1"), req, timeout=2)
    refused = decode(msg.data, ErrorReply)
    assert refused.code is ErrorCode.INVALID_PAYLOAD


async def test_bad_registration_payload_gets_a_code(
    controller: Controller, connect_as: Clients
) -> None:
    nc = await connect_as("n1")
    msg = await nc.request(subjects.node_register("n1"), b"{nope", timeout=2)
    assert decode(msg.data, ErrorReply).code is ErrorCode.INVALID_PAYLOAD


async def test_micro_discovery_sees_the_controller(
    controller: Controller, connect_as: Clients
) -> None:
    viewer = await connect_as("view-1")
    msg = await viewer.request("$SRV.PING.fabric-controller", b"", timeout=2)
    ping = json.loads(msg.data)
    assert ping["name"] == "fabric-controller"
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    msg = await viewer.request("$SRV.INFO.fabric-controller", b"", timeout=2)
    subjects_served = {e["subject"] for e in json.loads(msg.data)["endpoints"]}
    assert subjects_served == {"nodes.*.register", "fabric.discover", "fabric.api.*"}


# --- operator API --------------------------------------------------------------


async def test_api_create_get_list_delete(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")

    def token(*scopes: str) -> str:
        return issuer.mint("alice", list(scopes))

    created = await call(
        op, "create", {"deployment": deployment("api-a"), "token": token("agents:run")}
    )
    assert isinstance(created, ApiResult)
    assert created.changed
    assert created.deployments[0].created_by == "alice"
    again = await call(
        op, "create", {"deployment": deployment("api-a"), "token": token("agents:run")}
    )
    assert isinstance(again, ApiResult)
    assert not again.changed  # idempotent
    other = await call(
        op, "create", {"deployment": deployment("api-a", 2), "token": token("agents:run")}
    )
    assert isinstance(other, ErrorReply)
    assert other.code is ErrorCode.ALREADY_EXISTS
    got = await call(op, "get", {"name": "api-a", "token": token("read")})
    assert isinstance(got, ApiResult)
    assert got.deployments[0].deployment.spec.name == "api-a"
    listed = await call(op, "list", {"token": token("read")})
    assert isinstance(listed, ApiResult)
    assert "api-a" in [d.name for d in listed.deployments]
    scaled = await call(op, "scale", {"name": "api-a", "replicas": 3, "token": token("agents:run")})
    assert isinstance(scaled, ApiResult)
    assert scaled.deployments[0].deployment.replicas == 3
    gone = await call(op, "delete", {"name": "api-a", "token": token("agents:stop")})
    assert isinstance(gone, ApiResult)
    assert gone.changed


@pytest.mark.parametrize(
    ("method", "body", "code"),
    [
        ("create", {"deployment": deployment("api-b")}, ErrorCode.TOKEN_MISSING),
        ("create", {"deployment": deployment("api-b"), "token": "x.y.z"}, ErrorCode.TOKEN_INVALID),
        ("create", {"deployment": deployment("api-b"), "token": "READ"}, ErrorCode.TOKEN_SCOPE),
        (
            "create",
            {"deployment": deployment("api-b"), "token": "BOUND"},
            ErrorCode.TOKEN_WRONG_TARGET,
        ),
        (
            "create",
            {"deployment": {"spec": {"name": "Bad!"}}, "token": "RUN"},
            ErrorCode.INVALID_PAYLOAD,
        ),
        ("get", {"name": "nobody", "token": "READ"}, ErrorCode.NOT_FOUND),
        ("delete", {"name": "nobody", "token": "STOP"}, ErrorCode.NOT_FOUND),
        ("scale", {"name": "nobody", "replicas": 2, "token": "RUN"}, ErrorCode.NOT_FOUND),
        ("update", {"deployment": deployment("nobody"), "token": "RUN"}, ErrorCode.NOT_FOUND),
        ("cordon", {"node_id": "nobody", "token": "ADMIN"}, ErrorCode.NOT_FOUND),
        ("explode", {"token": "READ"}, ErrorCode.UNKNOWN_OP),
    ],
)
async def test_api_errors_have_codes(
    controller: Controller,
    connect_as: Clients,
    issuer: TokenIssuer,
    method: str,
    body: dict[str, Any],
    code: ErrorCode,
) -> None:
    tokens = {
        "READ": issuer.mint("alice", ["read"]),
        "RUN": issuer.mint("alice", ["agents:run"]),
        "STOP": issuer.mint("alice", ["agents:stop"]),
        "ADMIN": issuer.mint("alice", ["nodes:admin"]),
        "BOUND": issuer.mint("alice", ["agents:run"], agent="other"),
    }
    if body.get("token") in tokens:
        body = {**body, "token": tokens[body["token"]]}
    reply = await call(await connect_as("op-1"), method, body)
    assert isinstance(reply, ErrorReply)
    assert reply.code is code


async def test_cordon_and_uncordon(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    node = FakeNode(await connect_as("n2"), "n2", verifier)
    await node.register()
    op = await connect_as("op-1")
    admin = issuer.mint("alice", ["nodes:admin"], ttl=60)
    cordoned = await call(op, "cordon", {"node_id": "n2", "token": admin})
    assert isinstance(cordoned, ApiResult)
    assert cordoned.node is not None
    assert cordoned.node.state.value == "cordoned"
    back = await call(op, "uncordon", {"node_id": "n2", "token": issuer.mint("a", ["nodes:admin"])})
    assert isinstance(back, ApiResult)
    assert back.node is not None
    assert back.node.state.value == "ready"


# --- the leader's loop: placement, node loss, heal -----------------------------


async def test_place_then_fail_over_then_stop_the_stale_copy(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    events: list[dict[str, Any]] = []
    watcher = await connect_as("op-1")

    async def on_event(msg: Msg) -> None:
        events.append(json.loads(msg.data))

    await watcher.subscribe("events.>", cb=on_event)
    n1 = FakeNode(await connect_as("n1"), "n1", verifier)
    n2 = FakeNode(await connect_as("n2"), "n2", verifier)
    await n1.start()
    await n2.start()
    async with asyncio.TaskGroup() as tg:
        beats = [tg.create_task(n1.heartbeat_loop()), tg.create_task(n2.heartbeat_loop())]
        try:
            body = {
                "deployment": deployment("fo", labels={}),
                "token": issuer.mint("alice", ["agents:run"]),
            }
            # Pin the first copy on n1 by cordoning n2 until it is placed.
            admin = issuer.mint("alice", ["nodes:admin"])
            await call(watcher, "cordon", {"node_id": "n2", "token": admin})
            created = await call(watcher, "create", body)
            assert isinstance(created, ApiResult)
            await n1.wait(lambda: "fo" in n1.agents)
            first_epoch = n1.agents["fo"]
            admin = issuer.mint("alice", ["nodes:admin"])
            await call(watcher, "uncordon", {"node_id": "n2", "token": admin})

            # n1 goes silent (partition): after node_timeout it is lost, fo moves to n2.
            loop = asyncio.get_running_loop()
            n1.beating = False
            cut = loop.time()
            await n2.wait(lambda: "fo" in n2.agents, within=TIMEOUT + 3)
            assert loop.time() - cut < TIMEOUT + 1.5
            assert n2.agents["fo"] > first_epoch
            assert "fo" in n1.agents  # the stale copy still runs on the cut-off node

            # The partition heals: n1 heartbeats its stale copy and is told to stop it.
            n1.beating = True
            await n1.wait(lambda: "fo" not in n1.agents, within=3)
            removes = [c for c in n1.commands if isinstance(c, RemoveAgent)]
            assert removes[-1].epoch == first_epoch
            assert list(n2.agents) == ["fo"]
            await until(lambda: any(e["type"].endswith("agent.replaced") for e in events), 3)
        finally:
            for b in beats:
                b.cancel()
    kinds = [e["type"].removeprefix("io.agent-fabric.") for e in events]
    assert "node.lost" in kinds
    replaced = next(e for e in events if e["type"].endswith("agent.replaced"))
    assert replaced["data"]["from_node"] == "n1"
    assert replaced["data"]["to_node"] == "n2"
    assert replaced["source"] == "/controllers/ctl-1"
    created_event = next(e for e in events if e["type"].endswith("deployment.created"))
    assert created_event["actor"] == "alice"


async def test_registration_reply_carries_the_nodes_placements(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    n1 = FakeNode(await connect_as("n1"), "n1", verifier)
    await n1.start()
    async with asyncio.TaskGroup() as tg:
        beat = tg.create_task(n1.heartbeat_loop())
        try:
            op = await connect_as("op-1")
            body = {
                "deployment": deployment("reg", capabilities=["summarize"]),
                "token": issuer.mint("alice", ["agents:run"]),
            }
            await call(op, "create", body)
            await n1.wait(lambda: "reg" in n1.agents)
            epoch = n1.agents["reg"]
            n1.agents.clear()  # as if the node agent lost its state
            reply = await n1.register()
            assert [(p.spec.name, p.epoch) for p in reply.agents if p.spec.name == "reg"] == [
                ("reg", epoch)
            ]
            assert isinstance(reply.agents[0].spec, AgentSpec)
        finally:
            beat.cancel()


# --- high availability ---------------------------------------------------------


async def test_standby_takes_over_when_the_leader_dies(pki: FabricPki, connect_as: Clients) -> None:
    leaders: list[str] = []
    watcher = await connect_as("op-1")

    async def on_leader(msg: Msg) -> None:
        leaders.append(json.loads(msg.data)["data"]["leader"])

    await watcher.subscribe("events.controller.leader", cb=on_leader)
    nc_a = await connect_as("ctl-1")
    a = Controller(nc_a, config(pki, "ctl-a"))
    b = Controller(await connect_as("ctl-1"), config(pki, "ctl-b"))
    async with running(a) as task_a:
        await until(lambda: a.lease is not None and a.lease.valid())
        async with running(b):
            await asyncio.sleep(0.5)  # wait-ok: b must stay a standby while a leads
            assert b.lease is not None
            assert not b.lease.is_leader
            await nc_a.close()  # the leader's process dies: no clean hand-over
            task_a.cancel()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await until(lambda: b.lease is not None and b.lease.valid(), 4)
            assert loop.time() - start < 1.0 + 1.0  # ttl + one poll, with slack
            await until(lambda: leaders[-1:] == ["ctl-b"], 3)
    assert leaders[0] in ("ctl-a", "ctl-1")  # earlier tests' leader may be announced first
