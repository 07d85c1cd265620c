"""Test harness: a Supervisor with recorded statuses/events and event-driven waits."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil

from node_agent.supervisor import Supervisor, SupervisorConfig
from schemas.agent import (
    AgentSpec,
    AgentState,
    AgentStatus,
    Backoff,
    RestartPolicy,
    RestartPolicyKind,
)

AGENTS = Path(__file__).resolve().parent
PY = sys.executable
DEADLINE = 10.0


def alive(pid: int) -> bool:
    """``pid`` runs: it exists and has not exited (a zombie not yet reaped has)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def script(name: str, *args: object) -> list[str]:
    return [PY, str(AGENTS / name), *map(str, args)]


def spec(name: str, argv: list[str], **kw: Any) -> AgentSpec:
    kw.setdefault("start_seconds", 0.0)
    kw.setdefault("stop_timeout", 2.0)
    return AgentSpec(name=name, argv=argv, **kw)


def policy(kind: str = "on-failure", **kw: Any) -> RestartPolicy:
    backoff = kw.pop("backoff", Backoff(initial=0.0, max=0.0, jitter=0.0))
    return RestartPolicy(policy=RestartPolicyKind(kind), backoff=backoff, **kw)


class Recorder:
    """Collects on_status/on_event calls; ``wait_*`` resolve on the call that matches."""

    def __init__(self) -> None:
        self.statuses: list[AgentStatus] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def on_status(self, status: AgentStatus) -> None:
        self.statuses.append(status)
        self._check()

    def on_event(self, kind: str, agent_id: str, data: dict[str, Any]) -> None:
        self.events.append((kind, agent_id, data))
        self._check()

    def _check(self) -> None:
        for cond, fut in list(self._waiters):
            if not fut.done() and cond():
                fut.set_result(None)

    async def wait(self, cond: Callable[[], bool], within: float = DEADLINE) -> None:
        if cond():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cond, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(within):
                await fut
        finally:
            self._waiters.remove(entry)

    def last(self, agent_id: str) -> AgentStatus:
        return [s for s in self.statuses if s.agent_id == agent_id][-1]

    def states(self, agent_id: str) -> list[AgentState]:
        """Distinct consecutive states seen for an agent."""
        out: list[AgentState] = []
        for s in self.statuses:
            if s.agent_id == agent_id and (not out or out[-1] is not s.state):
                out.append(s.state)
        return out

    def kinds(self, agent_id: str) -> list[str]:
        return [k for k, a, _ in self.events if a == agent_id]

    async def state(
        self, agent_id: str, state: AgentState, within: float = DEADLINE
    ) -> AgentStatus:
        await self.wait(
            lambda: any(s.agent_id == agent_id and s.state is state for s in self.statuses),
            within,
        )
        return [s for s in self.statuses if s.agent_id == agent_id and s.state is state][-1]

    async def event(
        self, kind: str, agent_id: str, count: int = 1, within: float = DEADLINE
    ) -> dict[str, Any]:
        def matches() -> list[dict[str, Any]]:
            return [d for k, a, d in self.events if k == kind and a == agent_id]

        await self.wait(lambda: len(matches()) >= count, within)
        return matches()[count - 1]

    def clear(self) -> None:
        self.statuses.clear()
        self.events.clear()


@asynccontextmanager
async def running(
    state_dir: Path, *, node_id: str = "n1", **config: Any
) -> AsyncIterator[tuple[Supervisor, Recorder]]:
    """A Supervisor in drain mode at exit, so every process a test starts is stopped."""
    rec = Recorder()
    config.setdefault("metrics_interval", 60.0)
    cfg = SupervisorConfig(node_id=node_id, state_dir=state_dir, **config)
    async with Supervisor(cfg, on_status=rec.on_status, on_event=rec.on_event) as sup:
        yield sup, rec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fifo_line(path: Path, within: float = DEADLINE) -> str:
    """Read one line a child writes into a FIFO (made with os.mkfifo), without blocking.

    Opened read-write so it never reads EOF while no writer has opened it yet.
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        async with asyncio.timeout(within):
            return (await reader.readline()).decode().strip()
    finally:
        transport.close()


async def until(cond: Callable[[], bool], within: float = DEADLINE, step: float = 0.01) -> None:
    """Poll a condition outside the supervisor's reach (a pid gone, a cgroup file)."""
    async with asyncio.timeout(within):
        # No event exists for these conditions: poll under the deadline.
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(step)  # wait-ok: polled condition under a deadline
