"""Helpers for tests that run a controller against nodes, fake or real.

* :class:`FakeNode` - a plain NATS client authenticated as a node: answers
  place/remove commands like a node agent and heartbeats what it "runs".
* :class:`Fleet` - real ``fabric-node`` processes by node id, stopped by pid.
* :class:`CopySampler` - which processes run each agent id, sampled every
  few ms, so a test can assert no two copies of one replica ever ran.
* :func:`controller_config`, :func:`running`, :func:`leader_of` - an
  in-process :class:`~fabric.controller.service.Controller` made and run.
* :func:`beating` - a fake node registered and heartbeating for a block;
  :func:`create` - an API create that retries through a lost reply.
* :class:`ControllerProcs` - ``fabric controller run`` subprocesses, stopped
  (or SIGKILLed) by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from agents.harness import until
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import FabricPki

from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer, TokenVerifier
from schemas import subjects
from schemas.agent import AgentState
from schemas.api import ApiResult
from schemas.codec import decode, decode_node_command, encode
from schemas.command import CommandResult, PlaceAgent, RemoveAgent
from schemas.errors import ErrorCode, ErrorReply
from schemas.node import (
    AgentSummary,
    NodeHeartbeat,
    NodeInfo,
    NodeResources,
    RegisterReply,
    RegisterRequest,
)

__all__ = [
    "ControllerProcs",
    "CopySampler",
    "FakeNode",
    "Fleet",
    "beating",
    "controller_config",
    "create",
    "leader_of",
    "node_info",
    "running",
    "until",
]

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def node_info(node_id: str, **labels: str) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        hostname=f"host-{node_id}",
        pid=100,
        version="0.1.0",
        labels=labels,
        capabilities=["summarize"] if node_id == "n1" else [],
        resources=NodeResources(cpus=4, memory_bytes=8 << 30),
        started_at=NOW,
    )


class FakeNode:
    """Answers node commands like a node agent and heartbeats what it holds."""

    def __init__(self, nc: Client, node_id: str, verifier: TokenVerifier) -> None:
        self.nc = nc
        self.node_id = node_id
        self.verifier = verifier
        self.agents: dict[str, int] = {}
        self.commands: list[PlaceAgent | RemoveAgent] = []
        self.senders: list[str] = []
        """Who minted each command's token (the controller's name), in order."""
        self.beating = True
        self.beats = 0
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.nc.subscribe(subjects.node_commands(self.node_id), cb=self._on_command)
        await self.register()

    async def register(self) -> RegisterReply:
        req = RegisterRequest(node=node_info(self.node_id), agents=self._summaries())
        msg = await self.nc.request(subjects.node_register(self.node_id), encode(req), timeout=2)
        reply = decode(msg.data, RegisterReply)
        for placement in reply.agents:
            self.agents[placement.spec.name] = placement.epoch
        return reply

    def _summaries(self) -> list[AgentSummary]:
        return [AgentSummary(a, AgentState.RUNNING, e) for a, e in sorted(self.agents.items())]

    async def _on_command(self, msg: Msg) -> None:
        command = decode_node_command(msg.data)
        assert isinstance(command, PlaceAgent | RemoveAgent)
        scope = "agents:run" if isinstance(command, PlaceAgent) else "agents:stop"
        claims = self.verifier.verify(command.token, scope=scope, node=self.node_id)
        self.commands.append(command)
        self.senders.append(claims.sub)
        if isinstance(command, PlaceAgent):
            self.agents[command.spec.name] = command.epoch
            reply: Any = CommandResult(op="place", node_id=self.node_id, agent_id=command.spec.name)
        elif (command.epoch or 0) < self.agents.get(command.agent_id, 0):
            reply = ErrorReply(code=ErrorCode.STALE_EPOCH, message="older")
        else:
            self.agents.pop(command.agent_id, None)
            reply = CommandResult(op="remove", node_id=self.node_id, agent_id=command.agent_id)
        await msg.respond(encode(reply))
        self.changed.set()

    async def heartbeat_loop(self) -> None:
        seq = 0
        while True:
            if self.beating:
                seq += 1
                beat = NodeHeartbeat(
                    node_id=self.node_id,
                    seq=seq,
                    sent_at=datetime.now(UTC),
                    pid=100,
                    agents=self._summaries(),
                )
                await self.nc.publish(subjects.node_heartbeat(self.node_id), encode(beat))
                self.beats += 1
            await asyncio.sleep(0.2)

    async def wait(self, predicate: Any, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self.changed.wait()


class Fleet:
    """Node agent processes by node id; every one stopped at the end."""

    def __init__(self, pki: FabricPki, server: NatsServer, base: Path) -> None:
        self.pki = pki
        self.server = server
        self.base = base
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str, url: str | None = None, **labels: str) -> None:
        ident = self.pki[node_id]
        env = {
            **os.environ,
            "FABRIC_NATS_URL": url or self.server.url,
            "FABRIC_CA": str(self.pki.ca),
            "FABRIC_CERT": str(ident.cert),
            "FABRIC_KEY": str(ident.key),
        }
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(self.base / node_id),
            "--token-key", str(self.pki.dir / "signing.pub"),
            "--metrics-interval", "0.5",
        ]  # fmt: skip
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        with (self.base / f"{node_id}.log").open("ab") as log:
            self.procs[node_id] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    async def stop_all(self) -> None:
        """SIGTERM every node agent (they drain their agents), SIGKILL after 20 s.

        Async on purpose: the proxy and the controller live on this loop, and
        a node agent's shutdown talks to NATS through them.
        """
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(p.poll() is not None for p in live), within=20)
        for proc in live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class CopySampler:
    """Samples, every few ms, which processes run each agent id (by FABRIC_AGENT_ID).

    Only processes carrying this sampler's own marker in their argv count, so
    a leftover of another run can never look like a second copy.
    """

    def __init__(self) -> None:
        self.marker = f"fleet-agent-{uuid.uuid4().hex[:12]}"
        self.sleeper = [sys.executable, "-c", "import time; time.sleep(600)", self.marker]
        self.max_copies: dict[str, int] = defaultdict(int)
        self.pids: dict[str, set[int]] = defaultdict(set)
        self.samples = 0
        self.since_mark: dict[str, int] = defaultdict(int)

    def mark(self) -> None:
        """From now on, ``since_mark`` holds the most copies seen at once."""
        self.since_mark = defaultdict(int)

    def sample(self) -> dict[str, list[int]]:
        now: dict[str, list[int]] = defaultdict(list)
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmdline = proc.info["cmdline"] or []
            if self.marker not in cmdline or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with contextlib.suppress(psutil.Error):
                agent_id = proc.environ().get("FABRIC_AGENT_ID", "?")
                now[agent_id].append(proc.pid)
        for agent_id, pids in now.items():
            self.max_copies[agent_id] = max(self.max_copies[agent_id], len(pids))
            self.since_mark[agent_id] = max(self.since_mark[agent_id], len(pids))
            self.pids[agent_id].update(pids)
        self.samples += 1
        return now

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.01)  # wait-ok: the sampling period, not a synchronisation


def controller_config(pki: FabricPki, name: str, **overrides: Any) -> ControllerConfig:
    """A controller with test timings: node_timeout 1.5 s, lease 1 s, pass every 0.1 s."""
    lease_ttl = overrides.pop("lease_ttl", 1.0)
    settings: dict[str, Any] = {
        "node_timeout": 1.5,
        "reconcile_interval": 0.1,
        **overrides,
    }
    return ControllerConfig(
        name=name,
        signing_key=pki.dir / "signing.key",
        verify_keys=(pki.dir / "signing.pub",),
        lease_ttl=lease_ttl,
        streams=StreamSettings(lease_ttl=lease_ttl),
        **settings,
    )


@contextlib.asynccontextmanager
async def running(ctl: Controller) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``ctl`` until the block ends (then cancel it: the lease is released)."""
    task = asyncio.create_task(ctl.run())
    try:
        async with asyncio.timeout(10):
            await ctl.started.wait()
        yield task
    finally:
        await stop_run(task)


async def stop_run(run: asyncio.Task[None], within: float = 30.0) -> None:
    """Cancel a controller's run; one that does not end in time fails the test
    with the stacks of every task still alive (not a silent hang)."""
    run.cancel()
    done, _ = await asyncio.wait({run}, timeout=within)
    if done:
        return
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        print(task, file=stacks)
        task.print_stack(file=stacks)
    raise AssertionError(f"controller still running {within} s after cancel:\n{stacks.getvalue()}")


def leader_of(*controllers: Controller) -> Controller | None:
    """The one controller whose lease is valid now, None when there is none."""
    leaders = [c for c in controllers if c.lease is not None and c.lease.valid()]
    assert len(leaders) <= 1, [c.config.name for c in leaders]
    return leaders[0] if leaders else None


class ControllerProcs:
    """``fabric controller run`` subprocesses by name; every one stopped by pid."""

    def __init__(self, pki: FabricPki, base: Path) -> None:
        self.pki = pki
        self.base = base
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, urls: Sequence[str], *, identity: str = "ctl-1", lease_ttl: float = 1.0
    ) -> subprocess.Popen[bytes]:
        ident = self.pki[identity]
        argv = [
            sys.executable, "-m", "fabric", "controller", "run",
            "--name", name,
            "--url", ",".join(urls),
            "--ca", str(self.pki.ca),
            "--cert", str(ident.cert),
            "--key", str(ident.key),
            "--pki", str(self.pki.dir),
            "--lease-ttl", str(lease_ttl),
        ]  # fmt: skip
        with (self.base / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL: no clean hand-over of the lease."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    async def stop_all(self) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(p.poll() is not None for p in live), within=10)
        for proc in live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def beating(node: FakeNode) -> AsyncIterator[FakeNode]:
    """Register ``node`` (a controller must answer) and heartbeat for the block."""
    await node.start()
    beat = asyncio.create_task(node.heartbeat_loop())
    try:
        yield node
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)


async def create(
    op: Client, issuer: TokenIssuer, name: str, *, replicas: int = 1, within: float = 30
) -> ApiResult:
    """Create a deployment of ``sleep 100``, retrying a lost or refused reply.

    A fresh token each time: a token is good for one request, even one whose
    reply was lost.
    """
    deployment = {"spec": {"name": name, "argv": ["sleep", "100"]}, "replicas": replicas}
    async with asyncio.timeout(within):
        while True:
            body = {"deployment": deployment, "token": issuer.mint("alice", ["agents:run"])}
            try:
                msg = await op.request(subjects.api("create"), json.dumps(body).encode(), timeout=3)
            except TimeoutError:
                continue
            reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
            if isinstance(reply, ApiResult):
                return reply
            await asyncio.sleep(0.2)  # wait-ok: refused while JetStream elects a leader
