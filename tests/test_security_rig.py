"""Helpers shared by the ``test_security_*`` modules (and ``bench/chaos/fuzz.py``).

No tests of its own: a live node agent run in-process, a collector of
CloudEvents, and tokens an attacker could make (signed by the wrong key,
``alg: none``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import FabricPki

from fabric.tokens import DEFAULT_AUDIENCE, TokenIssuer, TokenVerifier
from node_agent.config import NodeAgentConfig
from node_agent.service import NodeAgent
from schemas.codec import decode
from schemas.event import CloudEvent

__all__ = [
    "SLEEPER",
    "Events",
    "alg_none_token",
    "forged_token",
    "node_config",
    "running_node",
]

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def node_config(
    pki: FabricPki, url: str, state_dir: Path, node: str = "n1", **overrides: Any
) -> NodeAgentConfig:
    settings: dict[str, Any] = {
        "heartbeat_interval": 0.2,
        "metrics_interval": 0.5,
        "register_timeout": 0.5,
        **overrides,
    }
    return NodeAgentConfig(
        node_id=node,
        state_dir=state_dir,
        token_keys=(pki.dir / "signing.pub",),
        nats_urls=url,
        ca=pki.ca,
        cert=pki[node].cert,
        key=pki[node].key,
        **settings,
    )


@contextlib.asynccontextmanager
async def running_node(
    config: NodeAgentConfig, verifier: TokenVerifier | None = None
) -> AsyncIterator[NodeAgent]:
    """A NodeAgent connected and serving for the block; drained and awaited after it."""
    agent = NodeAgent(config, verifier or TokenVerifier.from_files(*config.token_keys))
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(10):
            ready = asyncio.create_task(agent.ready.wait())
            done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises what made the node stop
        yield agent
    finally:
        agent.request_shutdown("drain")
        async with asyncio.timeout(30):
            await asyncio.gather(task, return_exceptions=True)


class Events:
    """CloudEvents seen on one subscription, with a wait for a matching one."""

    def __init__(self) -> None:
        self.items: list[CloudEvent] = []
        self._changed = asyncio.Condition()

    async def handle(self, msg: Msg) -> None:
        event = decode(msg.data, CloudEvent)
        async with self._changed:
            self.items.append(event)
            self._changed.notify_all()

    @classmethod
    async def on(cls, nc: Client, subject: str) -> Events:
        events = cls()
        await nc.subscribe(subject, cb=events.handle)
        await nc.flush()
        return events

    def matching(self, predicate: Callable[[CloudEvent], bool]) -> list[CloudEvent]:
        return [e for e in self.items if predicate(e)]

    async def wait(
        self, predicate: Callable[[CloudEvent], bool], within: float = 5.0
    ) -> CloudEvent:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: bool(self.matching(predicate)))
            return self.matching(predicate)[0]

    async def wait_count(self, count: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.items) >= count)


def forged_token(subject: str, scopes: list[str], **kw: Any) -> str:
    """A well-formed token signed by a key the fabric does not trust."""
    return TokenIssuer(Ed25519PrivateKey.generate(), "mallory").mint(subject, scopes, **kw)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def alg_none_token(subject: str, scopes: list[str]) -> str:
    """The classic forgery: ``alg: none`` and no signature."""
    now = int(time.time())
    claims = {
        "sub": subject,
        "iss": "mallory",
        "aud": DEFAULT_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "forged-0001",
        "scopes": scopes,
    }
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
