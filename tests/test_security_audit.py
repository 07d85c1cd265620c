"""Token abuse is refused, counted and audited in the event stream with who tried.

Every abuse (no token, garbage, forged signature, ``alg: none``, expired,
replayed, wrong audience, wrong scope, bound to another agent or node) is
sent to a live node agent and a live controller. Each must come back as an
ErrorReply with its code, be counted, and show up as ``events.node.refused``
/ ``events.controller.refused`` naming the code, the NATS subject, the op and
who the token claims to be (unverified). A flood of junk is audited at most
10 times a second; the rest is counted as suppressed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleetfixtures import controller_config, node_info, running
from natsfixtures import Clients, FabricPki
from test_security_rig import (
    SLEEPER,
    Events,
    alg_none_token,
    forged_token,
    node_config,
    running_node,
)

from fabric.audit import Refusal, RefusalAudit, peek_message, unverified_subject
from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer
from node_agent.service import NodeAgent
from schemas import subjects
from schemas.agent import AgentSpec, AgentState
from schemas.api import ApiResult
from schemas.codec import decode, decode_reply, encode
from schemas.command import ListAgents, PlaceAgent, StatusAgent, StopAgent
from schemas.errors import ErrorCode, ErrorReply
from schemas.node import RegisterRequest

# --- the audit itself, no NATS ---------------------------------------------------


def test_the_claimed_subject_is_read_without_trust() -> None:
    assert unverified_subject(forged_token("mallory", ["read"])) == "mallory"
    assert unverified_subject(alg_none_token("eve", ["read"])) == "eve"
    for junk in (None, 5, "", "a.b", "a.b.c", "x" * 9000, "a.%%%.c", "a.W10.c"):
        assert unverified_subject(junk) is None
    long = unverified_subject(forged_token("x" * 256, ["read"]))
    assert long is not None and len(long) == 128


def test_peek_never_raises_and_finds_the_target() -> None:
    assert peek_message(b'{"op":"place","spec":{"name":"web"}}').target == "web"
    assert peek_message(b'{"deployment":{"spec":{"name":"d"}}}').target == "d"
    assert peek_message(b'{"op":"remove","agent_id":"a1"}').target == "a1"
    for junk in (b"", b"\xff\xfe", b"[" * 100_000, b'{"op":' * 5000, b"null", b'{"spec":7}'):
        peek_message(junk)


def test_rate_limit_counts_what_it_suppresses() -> None:
    now = [0.0]
    written: list[dict[str, object]] = []
    audit = RefusalAudit(lambda data, _actor: written.append(data), clock=lambda: now[0])
    refusal = Refusal(code=ErrorCode.TOKEN_INVALID, subject="fabric.api.create")
    results = [audit(refusal) for _ in range(25)]
    assert results.count(True) == 10
    assert (audit.emitted, audit.suppressed) == (10, 15)
    now[0] += 0.5  # five more tokens
    assert [audit(refusal) for _ in range(6)] == [True] * 5 + [False]
    assert written[10]["suppressed"] == 15  # the first event after a gap says what was lost
    assert written[11]["suppressed"] == 0
    # Ordinary answers are counted by the services but never audited.
    assert not audit(Refusal(code=ErrorCode.NOT_FOUND, subject="fabric.api.get"))
    assert audit.suppressed == 16


# --- live ------------------------------------------------------------------------


@dataclass(frozen=True)
class Abuse:
    label: str
    body: bytes
    code: ErrorCode
    claimed_by: str | None
    op: str | None = None
    """The op the body carries, when not the one the test sends the others as."""


@pytest.fixture
def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", issuer="tests")


@pytest.fixture
async def node(pki: FabricPki, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    async with running_node(node_config(pki, nats_server.url, tmp_path / "node")) as agent:
        yield agent


def _token_abuses(
    issuer: TokenIssuer, pki: FabricPki, make: Any, scope: str, bind: dict[str, str]
) -> list[Abuse]:
    """Every way a token can be wrong; ``make(token)`` builds the message around it."""
    past = TokenIssuer.from_file(
        pki.dir / "signing.key", issuer="tests", clock=lambda: time.time() - 3600
    )
    wrong_scope = "read" if scope != "read" else "agents:run"
    other = {k: "someone-else" for k in bind} or {"agent": "someone-else"}
    return [
        Abuse("missing", make(None), ErrorCode.TOKEN_MISSING, None),
        Abuse("garbage", make("not-a-jwt"), ErrorCode.TOKEN_INVALID, None),
        Abuse("forged", make(forged_token("mallory", [scope])), ErrorCode.TOKEN_INVALID, "mallory"),
        Abuse("alg-none", make(alg_none_token("eve", [scope])), ErrorCode.TOKEN_INVALID, "eve"),
        Abuse(
            "expired",
            make(past.mint("op-old", [scope], ttl=60)),
            ErrorCode.TOKEN_EXPIRED,
            "op-old",
        ),
        Abuse(
            "audience",
            make(issuer.mint("op-aud", [scope], audience="other-fabric")),
            ErrorCode.TOKEN_WRONG_AUDIENCE,
            "op-aud",
        ),
        Abuse(
            "scope",
            make(issuer.mint("op-scope", [wrong_scope])),
            ErrorCode.TOKEN_SCOPE,
            "op-scope",
        ),
        Abuse(
            "target",
            make(issuer.mint("op-target", [scope], **other)),
            ErrorCode.TOKEN_WRONG_TARGET,
            "op-target",
        ),
    ]


async def _check_abuses(
    nc: Any,
    subject: str,
    abuses: list[Abuse],
    events: Events,
    *,
    op: str,
    target: str | None,
    reply_type: Any,
) -> None:
    for abuse in abuses:
        msg = await nc.request(subject, abuse.body, timeout=5)
        reply = decode(msg.data, reply_type)
        assert isinstance(reply, ErrorReply), abuse.label
        assert reply.code is abuse.code, (abuse.label, reply)
        event = await events.wait(
            lambda e, a=abuse: (
                e.data["code"] == a.code.value and e.data["claimed_by"] == a.claimed_by
            )
        )
        assert event.data["subject"] == subject, abuse.label
        assert event.data["op"] == (abuse.op or op), abuse.label
        assert event.data["target"] == target, abuse.label
        assert event.data["verified"] is False, abuse.label
        assert event.actor is None, abuse.label  # a claim is not an actor


async def test_node_refuses_counts_and_audits_every_token_abuse(
    node: NodeAgent, connect_as: Clients, issuer: TokenIssuer, pki: FabricPki
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.node.refused")
    spec = AgentSpec(name="target", argv=SLEEPER, start_seconds=0)
    placed = decode_reply(
        (
            await op.request(
                subjects.node_commands("n1"),
                encode(PlaceAgent(spec=spec, token=issuer.mint("op-1", ["agents:run"]))),
                timeout=10,
            )
        ).data
    )
    assert not isinstance(placed, ErrorReply), placed
    agent_subject = subjects.agent_commands("target")

    def stop(token: str | None) -> bytes:
        return encode(StopAgent(token=token))

    abuses = _token_abuses(issuer, pki, stop, "agents:stop", {"agent": "target"})
    replayed = issuer.mint("op-replay", ["read"])
    first = decode_reply(
        (await op.request(agent_subject, encode(StatusAgent(token=replayed)))).data
    )
    assert not isinstance(first, ErrorReply)
    abuses.append(
        Abuse(
            "replayed",
            encode(StatusAgent(token=replayed)),
            ErrorCode.TOKEN_REPLAYED,
            "op-replay",
            op="status",
        )
    )
    await _check_abuses(
        op, agent_subject, abuses, events, op="stop", target="target", reply_type=ErrorReply
    )

    # Node commands: a token bound to another node is refused on this one.
    node_subject = subjects.node_commands("n1")
    bound = issuer.mint("op-n2", ["read"], node="n2")
    msg = await op.request(node_subject, encode(ListAgents(token=bound)), timeout=5)
    assert decode(msg.data, ErrorReply).code is ErrorCode.TOKEN_WRONG_TARGET
    event = await events.wait(lambda e: e.data["subject"] == node_subject)
    assert (event.data["code"], event.data["op"], event.data["claimed_by"]) == (
        "token_wrong_target",
        "list",
        "op-n2",
    )
    assert event.source == "/nodes/n1"
    assert event.type == "io.agent-fabric.node.refused"

    handler = node._handler
    assert handler is not None
    for abuse in abuses:
        assert handler.refused[abuse.code] >= 1, abuse.label
    assert handler.refused[ErrorCode.TOKEN_WRONG_TARGET] == 2
    # Nothing the abusers sent changed the agent.
    status = decode_reply(
        (
            await op.request(
                agent_subject, encode(StatusAgent(token=issuer.mint("op-1", ["read"]))), timeout=5
            )
        ).data
    )
    assert not isinstance(status, ErrorReply)
    assert status.status is not None and status.status.state is AgentState.RUNNING


async def test_node_audit_is_rate_limited_under_a_flood(
    node: NodeAgent, connect_as: Clients
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.node.refused")
    subject = subjects.node_commands("n1")
    flood = 200
    started = time.monotonic()
    replies = await asyncio.gather(
        *(op.request(subject, b"junk %d" % i, timeout=10) for i in range(flood))
    )
    elapsed = time.monotonic() - started
    assert all(decode(r.data, ErrorReply).code is ErrorCode.INVALID_PAYLOAD for r in replies)
    audit = node.audit
    assert audit.emitted + audit.suppressed == flood
    assert audit.emitted <= 10 + 10 * elapsed + 1
    assert audit.suppressed >= flood - (10 + 10 * elapsed + 1)
    await events.wait_count(audit.emitted)
    assert len(events.items) == audit.emitted
    stats = await op.request("$SRV.STATS.fabric-node", b"", timeout=5)
    assert b'"audit_suppressed"' in stats.data


# --- the controller --------------------------------------------------------------


@pytest.fixture
async def controller(pki: FabricPki, connect_as: Clients) -> AsyncIterator[Controller]:
    ctl = Controller(await connect_as("ctl-1"), controller_config(pki, "ctl-1"))
    async with running(ctl):
        yield ctl


def _create(token: str | None) -> bytes:
    body: dict[str, Any] = {"deployment": {"spec": {"name": "web", "argv": ["sleep", "9"]}}}
    if token is not None:
        body["token"] = token
    return encode(body)


async def test_controller_refuses_counts_and_audits_every_token_abuse(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer, pki: FabricPki
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.controller.refused")
    create = subjects.api("create")
    abuses = _token_abuses(issuer, pki, _create, "agents:run", {"agent": "web"})
    await _check_abuses(
        op, create, abuses, events, op="create", target="web", reply_type=ApiResult | ErrorReply
    )

    replayed = issuer.mint("op-replay", ["read"])
    list_subject = subjects.api("list")
    first = await op.request(list_subject, encode({"token": replayed}), timeout=5)
    assert isinstance(decode(first.data, ApiResult | ErrorReply), ApiResult)
    again = await op.request(list_subject, encode({"token": replayed}), timeout=5)
    assert decode(again.data, ErrorReply).code is ErrorCode.TOKEN_REPLAYED
    event = await events.wait(lambda e: e.data["code"] == "token_replayed")
    assert (event.data["subject"], event.data["op"], event.data["claimed_by"]) == (
        list_subject,
        "list",
        "op-replay",
    )
    assert event.source == "/controllers/ctl-1"

    # A node registering under its own subject with a body that names another.
    n1 = await connect_as("n1")
    body = encode(RegisterRequest(node=node_info("n2")))
    reply = await n1.request(subjects.node_register("n1"), body, timeout=5)
    assert decode(reply.data, ErrorReply).code is ErrorCode.INVALID_PAYLOAD
    event = await events.wait(lambda e: e.data["subject"] == "nodes.n1.register")
    assert (event.data["op"], event.data["target"]) == ("register", "n1")

    for abuse in abuses:
        assert controller.refused[abuse.code.value] >= 1, abuse.label
    assert controller.refused[ErrorCode.TOKEN_REPLAYED.value] == 1
    deployments = controller.deployments
    assert deployments is not None and not deployments.items  # nothing was created
