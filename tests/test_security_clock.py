"""Clock skew between the token's issuer and a live verifier.

Tokens are minted by an issuer whose clock is skewed (its injectable
``clock``); a live node agent and a live controller verify them with the
default leeway. Within the leeway they pass; beyond it they are refused with
``token_not_yet_valid`` (issuer ahead) or ``token_expired`` (issuer behind,
token already past its expiry here), and audited with that code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleetfixtures import controller_config, running
from natsfixtures import Clients, FabricPki
from test_security_rig import Events, node_config, running_node

from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tokens import DEFAULT_LEEWAY, TokenIssuer
from schemas import subjects
from schemas.api import ApiResult
from schemas.codec import decode, encode
from schemas.command import CommandResult, ListAgents
from schemas.errors import ErrorCode, ErrorReply

LEEWAY = DEFAULT_LEEWAY


@dataclass(frozen=True)
class Skew:
    label: str
    offset: float
    """Seconds the issuer's clock is ahead (+) or behind (-) of the verifier's."""
    ttl: float
    refused: ErrorCode | None


# Margins of at least 2 s from every boundary: iat/nbf/exp are whole seconds.
SKEWS = [
    Skew("in sync", 0, 60, None),
    Skew("ahead, within leeway", LEEWAY - 3, 60, None),
    Skew("behind, short token already past exp, within leeway", -(LEEWAY - 3), 1, None),
    Skew("ahead, beyond leeway", LEEWAY + 3, 60, ErrorCode.TOKEN_NOT_YET_VALID),
    Skew("ahead by an hour", 3600, 60, ErrorCode.TOKEN_NOT_YET_VALID),
    Skew("behind, past exp beyond leeway", -(LEEWAY + 3), 1, ErrorCode.TOKEN_EXPIRED),
    Skew("behind by an hour", -3600, 60, ErrorCode.TOKEN_EXPIRED),
]


def _issuer(pki: FabricPki, offset: float) -> TokenIssuer:
    return TokenIssuer.from_file(
        pki.dir / "signing.key", issuer="skewed", clock=lambda: time.time() + offset
    )


async def test_node_accepts_skew_within_leeway_and_refuses_beyond(
    pki: FabricPki, nats_server: NatsServer, connect_as: Clients, tmp_path: Path
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.node.refused")
    subject = subjects.node_commands("n1")
    async with running_node(node_config(pki, nats_server.url, tmp_path / "node")):
        for skew in SKEWS:
            token = _issuer(pki, skew.offset).mint(
                f"op-{len(events.items)}", ["read"], ttl=skew.ttl
            )
            msg = await op.request(subject, encode(ListAgents(token=token)), timeout=5)
            reply = decode(msg.data, CommandResult | ErrorReply)  # type: ignore[arg-type]
            if skew.refused is None:
                assert isinstance(reply, CommandResult), (skew.label, reply)
            else:
                assert isinstance(reply, ErrorReply), skew.label
                assert reply.code is skew.refused, (skew.label, reply)
                await events.wait(
                    lambda e, s=skew: e.data["code"] == s.refused.value and e.data["op"] == "list"
                )
    assert len(events.items) == sum(1 for s in SKEWS if s.refused)


@pytest.fixture
async def controller(pki: FabricPki, connect_as: Clients) -> AsyncIterator[Controller]:
    ctl = Controller(await connect_as("ctl-1"), controller_config(pki, "ctl-1"))
    async with running(ctl):
        yield ctl


async def test_controller_accepts_skew_within_leeway_and_refuses_beyond(
    controller: Controller, pki: FabricPki, connect_as: Clients
) -> None:
    op = await connect_as("op-1")
    subject = subjects.api("list")
    for skew in SKEWS:
        token = _issuer(pki, skew.offset).mint("op-1", ["read"], ttl=skew.ttl)
        msg = await op.request(subject, encode({"token": token}), timeout=5)
        reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
        if skew.refused is None:
            assert isinstance(reply, ApiResult), (skew.label, reply)
        else:
            assert isinstance(reply, ErrorReply), skew.label
            assert reply.code is skew.refused, (skew.label, reply)
    refused = [s.refused.value for s in SKEWS if s.refused]
    for code in set(refused):
        assert controller.refused[code] == refused.count(code)
