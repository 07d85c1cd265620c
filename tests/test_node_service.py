"""The node agent's NATS face, against a real TLS nats-server and real children."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from agents.harness import alive, until
from chaosnode import NodeProc
from nats.aio.client import Client
from natsfixtures import ErrorLog, FabricPki

from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer, TokenVerifier
from node_agent.config import NodeAgentConfig
from node_agent.service import NodeAgent
from schemas import subjects
from schemas.agent import AgentSpec, AgentState, AgentStatus
from schemas.codec import decode, decode_reply, encode
from schemas.command import (
    ListAgents,
    PauseAgent,
    PlaceAgent,
    ResumeAgent,
    StatusAgent,
    StopAgent,
    TailLogs,
)
from schemas.errors import ErrorCode, ErrorReply
from schemas.event import CloudEvent
from schemas.logs import LogBatch
from schemas.node import NodeHeartbeat

SLEEPER = [sys.executable, "-c", "import time, sys; print('up', flush=True); time.sleep(600)"]


def node_config(
    pki: FabricPki, server: NatsServer, state_dir: Path, node: str = "n1"
) -> NodeAgentConfig:
    return NodeAgentConfig(
        node_id=node,
        state_dir=state_dir,
        token_keys=(pki.dir / "signing.pub",),
        nats_urls=server.url,
        ca=pki.ca,
        cert=pki[node].cert,
        key=pki[node].key,
        heartbeat_interval=0.2,
        metrics_interval=0.5,
        register_timeout=0.5,
    )


@pytest.fixture
def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", issuer="tests")


@pytest.fixture
async def node(pki: FabricPki, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    config = node_config(pki, nats_server, tmp_path / "node")
    agent = NodeAgent(config, TokenVerifier.from_files(*config.token_keys))
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(10):
        await agent.ready.wait()
    yield agent
    agent.request_shutdown("drain")
    async with asyncio.timeout(30):
        await task


class Watch:
    """Collects messages on a subject and waits for one that matches."""

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    async def handle(self, msg: Any) -> None:
        self.items.append(decode(msg.data, self.type))
        self._changed.set()

    async def wait(self, predicate: Callable[[Any], bool], within: float = 10.0) -> Any:
        async with asyncio.timeout(within):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                self._changed.clear()
                await self._changed.wait()


async def command(nc: Client, subject: str, message: Any) -> Any:
    msg = await nc.request(subject, encode(message), timeout=15)
    return decode_reply(msg.data)


def is_paused(pid: int) -> bool:
    """SIGSTOPped, or frozen in its cgroup v2 (the supervisor prefers freezing)."""
    if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
        return True
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            mount = next(
                p.mountpoint for p in psutil.disk_partitions(all=True) if p.fstype == "cgroup2"
            )
            events = Path(mount + line[3:]) / "cgroup.events"
            return events.exists() and "frozen 1" in events.read_text()
    return False


def token(issuer: TokenIssuer, *scopes: str, **kw: Any) -> str:
    return issuer.mint("op-1", list(scopes), **kw)


async def test_heartbeat_and_micro_discovery(node: NodeAgent, connect_as: Any) -> None:
    nc = await connect_as("view-1")
    beats = Watch(NodeHeartbeat)
    await nc.subscribe(subjects.node_heartbeat("n1"), cb=beats.handle)
    beat = await beats.wait(lambda b: b.seq >= 1)
    assert beat.node_id == "n1"
    assert beat.pid == os.getpid()
    reply = await nc.request("$SRV.PING.fabric-node", b"", timeout=5)
    ping = json.loads(reply.data)
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    assert ping["metadata"]["node_id"] == "n1"


async def test_place_then_control_an_agent(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    statuses = Watch(AgentStatus)
    events = Watch(CloudEvent)
    await op.subscribe(subjects.agent_status("sleeper"), cb=statuses.handle)
    await op.subscribe("events.agent.>", cb=events.handle)
    spec = AgentSpec(name="sleeper", argv=SLEEPER, start_seconds=0)
    placed = await command(
        op,
        subjects.node_commands("n1"),
        PlaceAgent(spec=spec, epoch=1, token=token(issuer, "agents:run")),
    )
    assert placed.status.agent_id == "sleeper"
    running = await statuses.wait(lambda s: s.state is AgentState.RUNNING)
    assert psutil.Process(running.pid).is_running()
    started = await events.wait(lambda e: e.subject == "sleeper")
    assert started.source == "/nodes/n1"
    assert started.actor == "op-1"

    agent_subject = subjects.agent_commands("sleeper")
    status = await command(op, agent_subject, StatusAgent(token=token(issuer, "read")))
    assert status.status.pid == running.pid

    paused = await command(op, agent_subject, PauseAgent(token=token(issuer, "agents:signal")))
    assert paused.status.state is AgentState.PAUSED
    await until(lambda: is_paused(running.pid))
    resumed = await command(op, agent_subject, ResumeAgent(token=token(issuer, "agents:signal")))
    assert resumed.status.state is AgentState.RUNNING

    async with asyncio.timeout(10):
        while True:  # the child prints once its interpreter is up
            logs = await command(op, agent_subject, TailLogs(token=token(issuer, "read"), lines=5))
            if logs.logs.lines:
                break
    assert logs.logs.lines == ["up"]

    listed = await command(
        op, subjects.node_commands("n1"), ListAgents(token=token(issuer, "read"))
    )
    assert [a.agent_id for a in listed.agents] == ["sleeper"]

    stopped = await command(op, agent_subject, StopAgent(token=token(issuer, "agents:stop")))
    assert stopped.status.state is AgentState.STOPPED
    assert not psutil.pid_exists(running.pid) or psutil.Process(running.pid).status() == "zombie"


async def test_bad_commands_are_refused_with_their_code_and_change_nothing(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer, pki: FabricPki
) -> None:
    op = await connect_as("op-1")
    spec = AgentSpec(name="steady", argv=SLEEPER, start_seconds=0)
    await command(
        op, subjects.node_commands("n1"), PlaceAgent(spec=spec, token=token(issuer, "agents:run"))
    )
    subject = subjects.agent_commands("steady")
    before = await command(op, subject, StatusAgent(token=token(issuer, "read")))

    replayed = token(issuer, "agents:stop")
    past = TokenIssuer.from_file(
        pki.dir / "signing.key", issuer="tests", clock=lambda: time.time() - 3600
    )
    await command(op, subject, StatusAgent(token=token(issuer, "read")))

    cases: list[tuple[bytes, ErrorCode]] = [
        (encode(StopAgent()), ErrorCode.TOKEN_MISSING),
        (encode(StopAgent(token="not-a-jwt")), ErrorCode.TOKEN_INVALID),
        (encode(StopAgent(token=token(issuer, "read"))), ErrorCode.TOKEN_SCOPE),
        (
            encode(StopAgent(token=token(issuer, "agents:stop", agent="other"))),
            ErrorCode.TOKEN_WRONG_TARGET,
        ),
        (
            encode(
                StopAgent(token=issuer.mint("op-1", ["agents:stop"], not_before=time.time() + 600))
            ),
            ErrorCode.TOKEN_NOT_YET_VALID,
        ),
        (
            encode(StopAgent(token=past.mint("op-1", ["agents:stop"], ttl=60))),
            ErrorCode.TOKEN_EXPIRED,
        ),
        (
            encode(StopAgent(token=issuer.mint("op-1", ["agents:stop"], audience="elsewhere"))),
            ErrorCode.TOKEN_WRONG_AUDIENCE,
        ),
        (b'{"op": "explode"}', ErrorCode.UNKNOWN_OP),
        (b'{"op": "signal", "signal": "SIGSEGV"}', ErrorCode.INVALID_PAYLOAD),
        (b"\xff\xfe garbage", ErrorCode.INVALID_PAYLOAD),
        (b'{"op": "stop", "token": "' + b"x" * 20000 + b'"}', ErrorCode.INVALID_PAYLOAD),
        (b"[" * 5000, ErrorCode.INVALID_PAYLOAD),
    ]
    for data, code in cases:
        msg = await op.request(subject, data, timeout=5)
        reply = decode_reply(msg.data)
        assert isinstance(reply, ErrorReply), data[:60]
        assert reply.code is code, (data[:60], reply)

    after = await command(op, subject, StatusAgent(token=token(issuer, "read")))
    assert after.status.state is AgentState.RUNNING
    assert (after.status.pid, after.status.restarts) == (before.status.pid, before.status.restarts)

    first = await command(op, subject, StopAgent(token=replayed, timeout=0.1))
    assert first.status.state is AgentState.STOPPED
    again = await command(op, subject, StopAgent(token=replayed))
    assert isinstance(again, ErrorReply)
    assert again.code is ErrorCode.TOKEN_REPLAYED

    handler = node._handler
    assert handler is not None
    assert handler.refused[ErrorCode.TOKEN_MISSING] >= 1
    assert handler.refused[ErrorCode.UNKNOWN_OP] >= 1

    # Node commands: unknown agent, bad id inside the payload.
    missing = await command(
        op,
        subjects.node_commands("n1"),
        {"op": "remove", "agent_id": "ghost", "token": token(issuer, "agents:stop")},
    )
    assert missing.code is ErrorCode.NOT_FOUND
    bad_id = await command(
        op,
        subjects.node_commands("n1"),
        {"op": "remove", "agent_id": "a.b", "token": token(issuer, "agents:stop")},
    )
    assert bad_id.code is ErrorCode.INVALID_PAYLOAD


async def test_stale_epoch_is_refused(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    spec = AgentSpec(name="fenced", argv=SLEEPER, start_seconds=0)
    subject = subjects.node_commands("n1")
    await command(op, subject, PlaceAgent(spec=spec, epoch=5, token=token(issuer, "agents:run")))
    stale = await command(
        op, subject, PlaceAgent(spec=spec, epoch=4, token=token(issuer, "agents:run"))
    )
    assert isinstance(stale, ErrorReply)
    assert stale.code is ErrorCode.STALE_EPOCH


async def test_server_refuses_a_viewer_command(node: NodeAgent, connect_as: Any) -> None:
    errors = ErrorLog()
    viewer = await connect_as("view-1", error_cb=errors)
    await viewer.publish(subjects.node_commands("n1"), encode(ListAgents()))
    await viewer.flush()
    await errors.wait_for("permissions violation for publish")
    handler = node._handler
    assert handler is not None
    assert sum(handler.accepted.values()) == 0


# --- kill -9 of the node agent, then a new one re-adopts ------------------------------


def _node_process(
    pki: FabricPki, server: NatsServer, tmp_path: Path, ignoring: tuple[int, ...] = ()
) -> NodeProc:
    """Node ``n2`` as a process of its own (state and log under ``tmp_path``),
    started with the signals in ``ignoring`` ignored (set here around the
    spawn: an ignored signal is inherited, as from nohup)."""
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignoring}
    try:
        return NodeProc(pki, server.url, tmp_path / "n2", tmp_path / "n2.log", "n2")
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


async def _stop_nodes_and_agents(
    nodes: Iterable[NodeProc | None], agent_pids: Iterable[int]
) -> None:
    """Stop each node process (SIGTERM, SIGKILL after 20 s), then kill by pid
    any agent process it left."""
    for node in nodes:
        if node is not None:
            await node.stop()
    for pid in agent_pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


async def test_kill_9_then_restart_readopts_every_agent(
    pki: FabricPki, nats_server: NatsServer, connect_as: Any, issuer: TokenIssuer, tmp_path: Path
) -> None:
    op = await connect_as("op-1")
    beats = Watch(NodeHeartbeat)
    await op.subscribe(subjects.node_heartbeat("n2"), cb=beats.handle)
    first = _node_process(pki, nats_server, tmp_path)
    second: NodeProc | None = None
    pids: dict[str, int] = {}
    try:
        await beats.wait(lambda b: b.pid == first.pid, within=20)
        for name in ("a1", "a2", "a3"):
            spec = AgentSpec(name=name, argv=SLEEPER, start_seconds=0)
            placed = await command(
                op,
                subjects.node_commands("n2"),
                PlaceAgent(spec=spec, token=token(issuer, "agents:run")),
            )
            assert placed.status.state is AgentState.RUNNING
            pids[name] = placed.status.pid
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        assert all(psutil.pid_exists(pid) for pid in pids.values())

        second = _node_process(pki, nats_server, tmp_path)
        beat = await beats.wait(
            lambda b: (
                b.pid == second.pid
                and len(b.agents) == 3
                and all(a.state is AgentState.RUNNING for a in b.agents)
            ),
            within=20,
        )
        assert {a.agent_id: a.pid for a in beat.agents} == pids
        # No duplicate: exactly one process per agent runs our sleeper.
        sleepers = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == SLEEPER]
        mine = {p.pid for p in sleepers} & set(pids.values())
        assert mine == set(pids.values())
        assert (
            len([p for p in sleepers if p.pid not in pids.values() and p.ppid() == second.pid]) == 0
        )
    finally:
        await _stop_nodes_and_agents([first, second], pids.values())


def _signal_mask(pid: int, field: str) -> int:
    """``SigIgn`` or ``SigCgt`` of ``pid``, from /proc: bit n-1 is signal n."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value, 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def test_agents_get_default_signals_from_a_node_started_ignoring_them(
    pki: FabricPki, nats_server: NatsServer, connect_as: Any, issuer: TokenIssuer, tmp_path: Path
) -> None:
    op = await connect_as("op-1")
    beats = Watch(NodeHeartbeat)
    await op.subscribe(subjects.node_heartbeat("n2"), cb=beats.handle)
    passed_on = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
    node = _node_process(pki, nats_server, tmp_path, ignoring=passed_on)
    pid: int | None = None
    try:
        await beats.wait(lambda b: b.pid == node.pid, within=20)
        bits = sum(1 << (s - 1) for s in passed_on)
        # The node goes on ignoring them (a handler that does nothing) ...
        assert _signal_mask(node.pid, "SigIgn") & bits == 0
        assert _signal_mask(node.pid, "SigCgt") & bits == bits
        os.kill(node.pid, signal.SIGHUP)
        # ... and its agent starts with each at the default, so it acts on them.
        spec = AgentSpec(name="hup", argv=SLEEPER, start_seconds=0)
        placed = await command(
            op,
            subjects.node_commands("n2"),
            PlaceAgent(spec=spec, token=token(issuer, "agents:run")),
        )
        assert placed.status.state is AgentState.RUNNING
        pid = placed.status.pid
        assert _signal_mask(pid, "SigIgn") & bits == 0
        os.kill(pid, signal.SIGHUP)
        await until(lambda: not alive(pid), within=10)
        assert node.alive(), "the node agent died of a SIGHUP it had been started ignoring"
    finally:
        await _stop_nodes_and_agents([node], [] if pid is None else [pid])


async def test_oversized_command_is_refused_before_decoding(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    spec = AgentSpec(name="big", argv=SLEEPER, env={"PAD": "x" * 30000}, start_seconds=0)
    huge = encode(PlaceAgent(spec=spec, token=token(issuer, "agents:run")))
    huge = huge[:-1] + b', "pad": "' + b"y" * (300 * 1024) + b'"}'
    msg = await op.request(subjects.node_commands("n1"), huge, timeout=5)
    reply = decode_reply(msg.data)
    assert isinstance(reply, ErrorReply)
    assert reply.code is ErrorCode.PAYLOAD_TOO_LARGE
    listed = await command(
        op, subjects.node_commands("n1"), ListAgents(token=token(issuer, "read"))
    )
    assert "big" not in [a.agent_id for a in listed.agents]


async def test_followed_logs_are_published_in_batches(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    talker = [
        sys.executable,
        "-c",
        "import sys, time\n"
        "for i in range(1000):\n"
        "    print(f'line {i}', flush=True)\n"
        "    print(f'err {i}', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.05)\n",
    ]
    batches = Watch(LogBatch)
    await op.subscribe(subjects.agent_logs("talker"), cb=batches.handle)
    spec = AgentSpec(name="talker", argv=talker, start_seconds=0)
    await command(
        op, subjects.node_commands("n1"), PlaceAgent(spec=spec, token=token(issuer, "agents:run"))
    )
    assert batches.items == [], "nothing is published until someone follows"
    await command(
        op,
        subjects.agent_commands("talker"),
        TailLogs(token=token(issuer, "read"), lines=1, follow=30),
    )

    def streams() -> set[str]:
        return {line.stream for b in batches.items for line in b.lines}

    await batches.wait(lambda _: streams() == {"stdout", "stderr"})
    lines = [line.line for b in batches.items for line in b.lines if line.stream == "stdout"]
    numbers = [int(text.split()[1]) for text in lines]
    assert numbers == sorted(numbers)
    assert [b.seq for b in batches.items] == list(range(len(batches.items)))
    assert all(b.agent_id == "talker" and b.node_id == "n1" for b in batches.items)


async def test_logs_since_a_time_skip_older_lines(
    node: NodeAgent, connect_as: Any, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    counter = [
        sys.executable,
        "-c",
        "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.02)\n",
    ]
    spec = AgentSpec(name="counter", argv=counter, start_seconds=0)
    await command(
        op, subjects.node_commands("n1"), PlaceAgent(spec=spec, token=token(issuer, "agents:run"))
    )
    subject = subjects.agent_commands("counter")

    async def numbers(since: datetime | None = None) -> list[int]:
        tail = TailLogs(token=token(issuer, "read"), lines=10_000, since=since)
        result = await command(op, subject, tail)
        return [int(line) for line in result.logs.lines]

    async with asyncio.timeout(20):
        while len(await numbers()) < 100:  # noqa: ASYNC110 - 2 s of output, several ticks
            await asyncio.sleep(0.1)  # wait-ok: polling the agent's output under a deadline
    cut = datetime.now(UTC)
    at_cut = (await numbers())[-1]
    async with asyncio.timeout(20):
        while (await numbers())[-1] < at_cut + 75:  # noqa: ASYNC110 - past the next ticks
            await asyncio.sleep(0.1)  # wait-ok: as above
    recent = await numbers(since=cut)
    assert recent, "lines written after the cut are returned"
    assert recent == list(range(recent[0], recent[0] + len(recent))), "a contiguous run"
    assert recent[-1] >= at_cut + 75
    # At most one metrics tick (0.5 s, about 25 lines here) of older output comes along.
    assert recent[0] > at_cut - 40
    assert recent[0] > 0
