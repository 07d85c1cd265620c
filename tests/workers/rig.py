"""A task-queue test rig: one fresh nats-server, an in-process dispatcher over a
view the test controls, worker processes spawned with the env a node gives.

``rig.view`` plays the registry: a worker started with :meth:`TaskRig.worker`
is added to it once it listens; a test may drop it to play an agent that
stopped. Every process is stopped by pid in :meth:`TaskRig.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import Clients, FabricPki

from fabric.nats_server import NatsServer
from fabric.tasks.client import TaskClient
from fabric.tasks.dispatch import Candidate, Dispatcher, DispatchSettings
from fabric.tasks.records import TaskRecord, decode_record
from fabric.tasks.stream import TASKS_STREAM, QueueSettings

WORKERS = Path(__file__).resolve().parent
LEDGER_WORKER = WORKERS / "ledger.py"
DISPATCHER = WORKERS / "dispatcher.py"


def fast_settings(
    ack_wait: float = 1.5, queue: QueueSettings | None = None, **kw: Any
) -> DispatchSettings:
    """Short delays so retries, waits and losses show within a test's time."""
    defaults: dict[str, Any] = {
        "no_agent_delay": 0.1,
        "no_agent_max": 0.3,
        "retry_base": 0.1,
        "retry_cap": 0.4,
        "handback_delay": 0.05,
        "shun_for": 3.0,
        "busy_hold": 0.5,
        "fetch_wait": 0.5,
    }
    defaults.update(kw)
    return DispatchSettings(queue=queue or QueueSettings(ack_wait=ack_wait), **defaults)


@dataclass
class TaskRig:
    pki: FabricPki
    server: NatsServer
    base: Path
    clients: Clients
    view: dict[str, Candidate] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    dispatchers: list[tuple[Dispatcher, asyncio.Task[None]]] = field(default_factory=list)
    ledger: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = self.base / "ledger.jsonl"

    # --- parts -----------------------------------------------------------------

    async def dispatcher(self, settings: DispatchSettings | None = None) -> Dispatcher:
        nc = await self.clients("ctl-1")
        dispatcher = Dispatcher(nc, "ctl-1", lambda: dict(self.view), settings or fast_settings())
        task = asyncio.create_task(dispatcher.run())
        self.dispatchers.append((dispatcher, task))
        ready = asyncio.create_task(dispatcher.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=10, return_when="FIRST_COMPLETED")
        assert ready in done, "dispatcher did not start"
        return dispatcher

    async def tasks(self) -> TaskClient:
        return TaskClient(await self.clients("op-1"), submitted_by="op-1")

    def env(self, identity: str, agent_id: str | None = None) -> dict[str, str]:
        ident = self.pki[identity]
        env = {
            **os.environ,
            "FABRIC_NODE_ID": "n1",
            "FABRIC_NATS_URL": self.server.url,
            "FABRIC_CA": str(self.pki.ca),
            "FABRIC_CERT": str(ident.cert),
            "FABRIC_KEY": str(ident.key),
        }
        if agent_id is not None:
            env["FABRIC_AGENT_ID"] = agent_id
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.base / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log)
        self.procs[name] = proc
        return proc

    async def started(self, name: str) -> subprocess.Popen[bytes]:
        """Wait for the process to print ``ready``."""
        proc = self.procs[name]
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=15)
        assert line.strip() == b"ready", f"{name} did not start: {line!r}"
        return proc

    async def worker(
        self, agent_id: str, *types: str, grace: float = 5.0, concurrency: int = 4
    ) -> subprocess.Popen[bytes]:
        """Spawn tests/workers/ledger.py as agent ``agent_id``; returns once it listens."""
        argv = [
            sys.executable, str(LEDGER_WORKER), str(self.ledger), *types,
            "--grace", str(grace), "--concurrency", str(concurrency),
        ]  # fmt: skip
        self.spawn(agent_id, argv, self.env("work-1", agent_id))
        proc = await self.started(agent_id)
        self.view[agent_id] = Candidate(agent_id, "n1", frozenset(types))
        return proc

    async def dispatcher_proc(
        self, name: str, ack_wait: float, agents: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """tests/workers/dispatcher.py as controller ``ctl-1``; ``agents``: id -> types."""
        argv = [sys.executable, str(DISPATCHER), name, str(ack_wait)]
        argv += [f"{agent_id}:{types}" for agent_id, types in agents.items()]
        self.spawn(name, argv, {**self.env("ctl-1"), "PYTHONPATH": str(WORKERS.parent.parent)})
        return await self.started(name)

    # --- observing ---------------------------------------------------------------

    def entries(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        lines = [json.loads(x) for x in self.ledger.read_text().splitlines() if x.strip()]
        return [x for x in lines if event is None or x["event"] == event]

    async def record_until(
        self, nc: Client, task_id: str, cond: Callable[[TaskRecord], bool], within: float = 15
    ) -> list[TaskRecord]:
        """Watch the task's record until ``cond``; every version seen, in order."""
        kv = await nc.jetstream().key_value("fabric_tasks")
        watcher = await kv.watch(task_id)
        seen: list[TaskRecord] = []
        try:
            async with asyncio.timeout(within):
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    seen.append(decode_record(entry.value))
                    if cond(seen[-1]):
                        return seen
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        raise AssertionError(f"record watch ended: {seen}")

    async def subscribe_events(self, nc: Client, subject: str) -> Events:
        events = Events()
        await nc.subscribe(subject, cb=events.on_msg)
        await nc.flush()
        return events

    async def queue_drained(self, within: float = 10) -> None:
        """Until stream TASKS holds nothing (acks and terms are sent without a reply)."""
        js = (await self.clients("ctl-1")).jetstream()
        async with asyncio.timeout(within):
            while (await js.stream_info(TASKS_STREAM)).state.messages:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # wait-ok: polling the server under a deadline

    # --- teardown ------------------------------------------------------------------

    def kill(self, agent_id: str) -> None:
        proc = self.procs[agent_id]
        proc.kill()
        proc.wait(timeout=10)

    async def aclose(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
            if proc.stdout is not None:
                proc.stdout.close()
        for _, task in self.dispatchers:
            task.cancel()
        await asyncio.gather(*(t for _, t in self.dispatchers), return_exceptions=True)
        await self.clients.aclose()


class Events:
    """Messages on a subscription, with a wait for the first that matches."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def on_msg(self, msg: Msg) -> None:
        async with self._changed:
            self.items.append(json.loads(msg.data))
            self._changed.notify_all()

    def matching(self, cond: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [e for e in self.items if cond(e)]

    async def wait_for(
        self, cond: Callable[[dict[str, Any]], bool], within: float = 15
    ) -> dict[str, Any]:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: bool(self.matching(cond)))
            return self.matching(cond)[0]


@contextlib.asynccontextmanager
async def task_rig(pki: FabricPki, base: Path) -> AsyncIterator[TaskRig]:
    """A fresh nats-server under ``base`` (an empty queue, no records) and a rig
    on it; the rig's processes, then the server, stopped on the way out."""
    server = NatsServer.local(pki.dir, base / "nats")
    await server.start()
    rig = TaskRig(pki, server, base, Clients(pki, default_urls=server.url))
    try:
        yield rig
    finally:
        await rig.aclose()
        await server.stop()
