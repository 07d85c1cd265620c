"""The task-queue chaos rig: whole controllers, a real node agent and its worker
agents as processes, on one server or a cluster, and an effect ledger.

Used by ``tests/test_tasks_chaos.py`` (short forms) and the scripts under
``bench/chaos/`` (long forms).

* :class:`ChaosRig` - starts ``tests/workers/controller.py`` processes (the
  real :class:`~fabric.controller.service.Controller`, test timings), a
  ``fabric-node`` process handing its agents the worker identity, and creates
  a deployment of ``tests/workers/ledger.py`` worker agents serving ``echo``
  through the controllers' API. Every process is stopped by its pid.
* :class:`Ledger` - reads the workers' shared effect ledger (one JSON line per
  handler start and per handler effect, ``O_APPEND``) incrementally.
* :class:`Submitter` - submits tasks with bounded concurrency and keeps which
  ones JetStream acknowledged (a PubAck) and which it did not.
* :func:`final_records` - every task record in one read of the bucket.

"Exactly once" here means: delivery is at least once, and the handler's
effect (a ``done`` line naming the task id) is idempotent by task id. So the
ledger deduplicated by id must hold every task exactly once and nothing else;
the raw count of ``done`` lines beyond that is the number of re-executions
(a task whose first run finished on a worker but whose result never got
stored, because the controller holding it died), reported, not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import psutil
from agents.harness import until
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import Clients, FabricPki, through_election

from fabric.controller.lease import LEASE_KEY, LeaseValue
from fabric.controller.streams import EVENTS_STREAM, LEASE_BUCKET
from fabric.nats_server import NatsCluster, NatsServer
from fabric.tasks.client import TaskClient
from fabric.tasks.records import TaskRecord, TaskState, decode_record
from fabric.tasks.stream import RECORDS_BUCKET
from fabric.tokens import TokenIssuer
from schemas import subjects
from schemas.api import ApiResult
from schemas.codec import decode
from schemas.errors import ErrorCode, ErrorReply
from schemas.task import BATCH_HEADER, TaskAssignment, TaskBatch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LEDGER_WORKER = TESTS / "workers" / "ledger.py"
CONTROLLER = TESTS / "workers" / "controller.py"


class Ledger:
    """The workers' effect ledger, read from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        self.starts: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.done_by_agent: Counter[str] = Counter()
        self.lines = 0

    def refresh(self) -> Ledger:
        if not self.path.exists():
            return self
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data, self._rest = self._rest + data, b""
        *whole, tail = data.split(b"\n")
        self._rest = tail  # a line being written: read it next time
        for line in whole:
            if not line.strip():
                continue
            entry = json.loads(line)
            self.lines += 1
            if entry["event"] == "start":
                self.starts[entry["task"]] += 1
            elif entry["event"] == "done":
                self.done[entry["task"]] += 1
                self.done_by_agent[entry["agent"]] += 1
        return self

    def effects(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` have their effect in the ledger (deduplicated)."""
        return sum(1 for i in ids if self.done[i])

    @property
    def raw_duplicates(self) -> int:
        """Effects beyond the first, over all tasks (re-executions that finished)."""
        return sum(n - 1 for n in self.done.values() if n > 1)

    @property
    def reruns(self) -> int:
        """Handler starts beyond the first, over all tasks."""
        return sum(n - 1 for n in self.starts.values() if n > 1)


@dataclass
class Submitter:
    """Submits tasks, at most ``concurrency`` at once; ``acked`` got a PubAck."""

    tasks: TaskClient
    concurrency: int = 128
    payload: Any = None
    acked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retried: int = 0

    async def submit(self, task_id: str) -> None:
        try:
            await self.tasks.submit("echo", self.payload, task_id=task_id, within=60)
        except Exception as exc:  # no PubAck: not acknowledged, so not owed a result
            self.failed[task_id] = f"{type(exc).__name__}: {exc}"
            return
        self.acked.append(task_id)

    async def submit_all(self, ids: Sequence[str]) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for task_id in ids:
            queue.put_nowait(task_id)

        async def lane() -> None:
            while not queue.empty():
                await self.submit(queue.get_nowait())

        await asyncio.gather(*(lane() for _ in range(min(self.concurrency, len(ids)))))

    async def stream(self, prefix: str, stop: asyncio.Event, rate: float) -> None:
        """Submit ``prefix-N`` tasks at about ``rate`` per second until ``stop``."""
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        gate = asyncio.Semaphore(self.concurrency)
        n = 0
        start = loop.time()
        while not stop.is_set():
            await gate.acquire()
            task = asyncio.create_task(self.submit(f"{prefix}-{n}"))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), gate.release()))
            n += 1
            ahead = start + n / rate - loop.time()
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ahead):
                        await stop.wait()  # the pacing of the load, not a synchronisation
        await asyncio.gather(*running)


async def final_records(nc: Client, within: float = 60) -> dict[str, TaskRecord]:
    """Every record in ``fabric_tasks`` (one ordered read of the bucket), the read
    tried again while JetStream elects a leader, within ``within`` seconds."""
    return await through_election(lambda: _read_records(nc), within)


async def settled_records(
    nc: Client, ids: Sequence[str], within: float = 30
) -> dict[str, TaskRecord]:
    """The bucket once every one of ``ids`` has a final record, or at ``within``.

    A worker writes its effect before it replies, and the result is stored
    after the reply: the last few records trail the ledger by a moment.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while True:
        records = await final_records(nc)
        if all(i in records and records[i].final for i in ids) or loop.time() > give_up:
            return records
        await asyncio.sleep(0.2)  # wait-ok: polling the bucket under a deadline


async def _read_records(nc: Client) -> dict[str, TaskRecord]:
    kv = await nc.jetstream().key_value(RECORDS_BUCKET)
    out: dict[str, TaskRecord] = {}
    watcher = await kv.watchall()
    try:
        async with asyncio.timeout(30):
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    out[entry.key] = decode_record(entry.value)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return out


async def stored_events(nc: Client, subject: str, within: float = 60) -> Counter[str]:
    """How often each CloudEvents ``subject`` (a task id) is stored in EVENTS
    under ``subject`` (e.g. ``events.task.completed``): one ordered read, begun
    again while JetStream elects a leader (a server just restarted), within
    ``within`` seconds."""
    return await through_election(lambda: _read_events(nc, subject), within)


async def _read_events(nc: Client, subject: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    total = (info.state.subjects or {}).get(subject, 0)
    if not total:
        return seen
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        read = 0
        while read < total:
            msg = await sub.next_msg(timeout=10)
            read += 1
            seen[json.loads(msg.data)["subject"]] += 1
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return seen


async def lease_holder(nc: Client) -> str | None:
    kv = await nc.jetstream().key_value(LEASE_BUCKET)
    try:
        entry = await kv.get(LEASE_KEY)
    except (nats.errors.Error, TimeoutError):
        return None
    if not entry.value:
        return None
    return msgspec.json.decode(entry.value, type=LeaseValue).holder


def connection_names(server: NatsServer, pki: FabricPki, identity: str = "ctl-1") -> list[str]:
    """Names of the clients connected to ``server`` now (its HTTPS ``/connz``)."""
    port = server.settings.monitor_port
    assert port is not None, "the server has no monitoring port"
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki[identity].cert), str(pki[identity].key))
    url = f"https://127.0.0.1:{port}/connz?limit=1024"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as reply:
        data = json.load(reply)
    return [c.get("name", "") for c in data.get("connections", [])]


class ChaosRig:
    """Controllers, a node agent and its worker agents as processes on ``urls``."""

    def __init__(self, pki: FabricPki, base: Path, urls: Sequence[str]) -> None:
        self.pki = pki
        self.base = base
        self.urls = list(urls)
        self.clients = Clients(pki, default_urls=self.urls)
        self.ledger_path = base / "ledger.jsonl"
        self.ledger = Ledger(self.ledger_path)
        self.controllers: dict[str, subprocess.Popen[bytes]] = {}
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.inboxes: dict[str, str] = {}
        """Reply inbox -> controller name (each prints its inboxes at start)."""
        self.issuer = TokenIssuer.from_file(pki.dir / "signing.key", "chaos")
        self._admin: Client | None = None

    async def admin(self) -> Client:
        """One controller-identity connection for the test's own reads."""
        if self._admin is None:
            self._admin = await self.clients("ctl-1")
        return self._admin

    def _env(self, identity: str) -> dict[str, str]:
        ident = self.pki[identity]
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FABRIC_NATS_URL": ",".join(self.urls),
            "FABRIC_CA": str(self.pki.ca),
            "FABRIC_CERT": str(ident.cert),
            "FABRIC_KEY": str(ident.key),
        }

    # --- controllers -----------------------------------------------------------

    def spawn_controller(
        self, name: str, *, lease_ttl: float, ack_wait: float = 3.0, node_timeout: float = 5.0
    ) -> subprocess.Popen[bytes]:
        """Start one controller process (it prints ``ready`` once it serves)."""
        argv = [
            sys.executable, str(CONTROLLER), name,
            "--pki", str(self.pki.dir),
            "--lease-ttl", str(lease_ttl),
            "--ack-wait", str(ack_wait),
            "--node-timeout", str(node_timeout),
        ]  # fmt: skip
        with (self.base / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv, env=self._env("ctl-1"), stdout=subprocess.PIPE, stderr=log
            )
        self.controllers[name] = proc
        return proc

    async def start_controllers(self, names: Sequence[str], **settings: float) -> None:
        """Start them all, then wait for each to print ``ready``."""
        for name in names:
            self.spawn_controller(name, **settings)
        for name in names:
            proc = self.controllers[name]
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=30)
            word, *inboxes = line.decode(errors="replace").split()
            assert word == "ready" and inboxes, f"controller {name} did not start: {line!r}"
            for inbox in inboxes:
                self.inboxes[inbox] = name

    def kill_controller(self, name: str) -> int:
        """SIGKILL by pid (no lease hand-over, no acks); returns the pid."""
        proc = self.controllers[name]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return proc.pid

    def controller_log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    # --- the node and its workers ------------------------------------------------

    def start_node(self, node_id: str = "n1") -> None:
        worker = self.pki["work-1"]
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(self.base / node_id),
            "--token-key", str(self.pki.dir / "signing.pub"),
            "--heartbeat-interval", "0.5",
            "--metrics-interval", "1",
            "--worker-cert", str(worker.cert),
            "--worker-key", str(worker.key),
        ]  # fmt: skip
        with (self.base / f"{node_id}.log").open("ab") as log:
            self.nodes[node_id] = subprocess.Popen(
                argv, env=self._env(node_id), stdout=log, stderr=log, cwd=ROOT
            )

    async def deploy_workers(
        self, op: Client, *, replicas: int, concurrency: int, name: str = "echo-w"
    ) -> None:
        """Create the worker deployment through the API (retried while unavailable)."""
        spec = {
            "name": name,
            "argv": [
                sys.executable, str(LEDGER_WORKER), str(self.ledger_path), "echo",
                "--concurrency", str(concurrency),
            ],
            "capabilities": ["echo"],
            "start_seconds": 0,
            "stop_timeout": 5,
        }  # fmt: skip
        deployment = {"spec": spec, "replicas": replicas}
        async with asyncio.timeout(30):
            while True:
                body = {"deployment": deployment, "token": self.issuer.mint("op-1", ["agents:run"])}
                try:
                    msg = await op.request(
                        subjects.api("create"), json.dumps(body).encode(), timeout=5
                    )
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    continue
                reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
                if isinstance(reply, ApiResult):
                    return
                assert reply.code is ErrorCode.UNAVAILABLE, reply
                await asyncio.sleep(0.2)  # wait-ok: JetStream electing, retry under a deadline

    def worker_pids(self) -> dict[str, int]:
        """Live worker agent processes of this rig, by agent id."""
        out: dict[str, int] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if str(LEDGER_WORKER) in cmdline and str(self.ledger_path) in cmdline:
                with contextlib.suppress(psutil.Error):
                    out[proc.environ().get("FABRIC_AGENT_ID", "?")] = proc.pid
        return out

    async def warm_up(self, tasks: TaskClient, workers: int, within: float = 60) -> None:
        """Until every worker agent has run a task (so every dispatcher sees them all)."""
        n = 0
        async with asyncio.timeout(within):
            while len(self.ledger.refresh().done_by_agent) < workers:
                batch = [f"warm-{n + i}" for i in range(workers * 4)]
                n += len(batch)
                await asyncio.gather(*(tasks.submit("echo", {}, task_id=i) for i in batch))

                def ran(batch: list[str] = batch) -> bool:
                    return self.ledger.refresh().effects(batch) == len(batch)

                with contextlib.suppress(TimeoutError):
                    await until(ran, within=10)

    # --- teardown --------------------------------------------------------------------

    async def aclose(self) -> None:
        """SIGTERM nodes (they stop their agents) and controllers; SIGKILL what stays."""
        procs = [*self.nodes.values(), *self.controllers.values()]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(p.poll() is not None for p in procs), within=20, step=0.05)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            await asyncio.to_thread(proc.wait, 10)
            if proc.stdout is not None:
                proc.stdout.close()
        # A worker orphaned by a node agent that had to be killed: by its own pid.
        for pid in self.worker_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.clients.aclose()


# --- the scenarios (the test asserts on what they return; bench/chaos prints it) ----


class Assignments:
    """Every assignment sent to a worker (``agents.*.tasks``), by the controller
    that sent it, with the loop time.

    A controller is known by the inboxes it replies to (``inboxes``: inbox ->
    controller name, as :meth:`ChaosRig.start_controllers` reads them): one
    for assignments sent one by one, another for its lane's batches. A reply
    under no known inbox counts under its own prefix.

    ``trap(sender, then)``: call ``then()`` from the callback of the next
    assignment ``sender`` sends, so a controller can be killed while that task
    is out on a worker.
    """

    def __init__(self, inboxes: dict[str, str]) -> None:
        self.inboxes = inboxes
        self.seen: list[tuple[float, str, str]] = []
        self._trap: tuple[str, Callable[[], object]] | None = None
        self.sprung = asyncio.Event()

    def sender(self, reply: str) -> str:
        for inbox, name in self.inboxes.items():
            if reply.startswith(f"{inbox}."):
                return name
        return reply.rsplit(".", 1)[0]

    async def on_msg(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(BATCH_HEADER) == "1":
            ids = [a.task.id for a in decode(msg.data, TaskBatch).assignments]
        else:
            ids = [decode(msg.data, TaskAssignment).task.id]
        sender = self.sender(msg.reply)
        now = asyncio.get_running_loop().time()
        self.seen.extend((now, sender, task_id) for task_id in ids)
        if self._trap is not None and self._trap[0] == sender:
            then, self._trap = self._trap[1], None
            then()
            self.sprung.set()

    def trap(self, sender: str, then: Callable[[], object]) -> None:
        self._trap = (sender, then)

    def senders_since(self, mark: int) -> int:
        """Distinct senders of the assignments seen after the first ``mark``."""
        return len({sender for _, sender, _ in self.seen[mark:]})

    def sent_by(self, sender: str, ids: set[str], mark: int) -> tuple[set[str], set[str]]:
        """Of ``ids``: those ``sender`` sent, and those of them another sender
        sent again after ``mark`` (an index into :attr:`seen`)."""
        mine = {t for _, s, t in self.seen if s == sender and t in ids}
        again = {t for _, s, t in self.seen[mark:] if s != sender and t in mine}
        return mine, again


class Leaders:
    """``events.controller.leader`` as it arrives: (loop time, leader name)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []

    async def on_msg(self, msg: Msg) -> None:
        leader = json.loads(msg.data)["data"]["leader"]
        self.seen.append((asyncio.get_running_loop().time(), leader))


@dataclass
class LeaderKill:
    """One run of "kill -9 the leader during a burst"."""

    tasks: int
    acked: int
    results: int
    """Records in ``succeeded`` with a result."""
    effects: int
    """Burst tasks whose effect is in the ledger (deduplicated by id)."""
    strays: int
    """Effects in the ledger for ids outside the burst (must be 0)."""
    raw_duplicates: int
    reruns: int
    leader: str
    successor: str
    takeover: float
    """Seconds from the kill to the successor's leader event."""
    seconds: float
    """Burst start to the last result."""
    killed_sent: int
    """Assignments the killed leader had sent to workers during the burst."""
    killed_resent: int
    """Of its tasks, those another controller sent again after the kill."""
    done_at_kill: int
    """Burst tasks with their effect when the leader was killed."""

    @property
    def lost(self) -> int:
        return self.tasks - self.results


async def leader_kill(
    rig: ChaosRig,
    *,
    burst: int,
    controllers: Sequence[str],
    lease_ttl: float,
    workers: int,
    concurrency: int = 32,
    kill_at: float = 0.2,
    prefix: str = "burst",
    hold: float = 0.1,
) -> LeaderKill:
    """Three (or more) controllers, a node with ``workers`` worker agents; submit
    ``burst`` tasks at once; once all are stored and ``kill_at`` of them have
    their effect, SIGKILL the lease holder; wait for a successor and for every
    effect and result.

    Each task holds its worker ``hold`` seconds, so the queue is still full
    when the last submit returns and every controller has tasks out on
    workers: the kill catches some mid-run.
    """
    admin = await rig.admin()
    op = await rig.clients("op-1")
    leaders = Leaders()
    sent = Assignments(rig.inboxes)
    await op.subscribe("events.controller.leader", cb=leaders.on_msg)
    await admin.subscribe("agents.*.tasks", cb=sent.on_msg)
    await rig.start_controllers(controllers, lease_ttl=lease_ttl)
    rig.start_node("n1")
    await rig.deploy_workers(op, replicas=workers, concurrency=concurrency)
    tasks = TaskClient(op, submitted_by="op-1")
    await rig.warm_up(tasks, workers)
    await until(lambda: lease_holder_seen(leaders, controllers), within=lease_ttl * 10)
    leader = await lease_holder(admin)
    assert leader in controllers, leader

    ids = [f"{prefix}-{i}" for i in range(burst)]
    submitter = Submitter(tasks, concurrency=256, payload={"sleep": hold, "progress": 1})
    loop = asyncio.get_running_loop()
    began = loop.time()
    await submitter.submit_all(ids)
    await until(lambda: rig.ledger.refresh().effects(ids) >= burst * kill_at, 120, step=0.05)
    announced = len(leaders.seen)
    killed: list[float] = []

    def kill() -> None:
        rig.kill_controller(leader)
        killed.append(loop.time())

    # Killed right as it hands a task to a worker: that one (at least) is out.
    sent.trap(leader, kill)
    async with asyncio.timeout(60):
        await sent.sprung.wait()
    killed_at, mark = killed[0], len(sent.seen)
    done_at_kill = rig.ledger.refresh().effects(ids)
    await until(lambda: len(leaders.seen) > announced, within=lease_ttl * 10)
    took, successor = leaders.seen[announced]
    with contextlib.suppress(TimeoutError):
        await until(lambda: rig.ledger.refresh().effects(ids) == burst, within=180, step=0.1)
    records = await settled_records(admin, ids)
    seconds = loop.time() - began
    wanted = set(ids)
    results = sum(
        1
        for i in ids
        if i in records
        and records[i].state is TaskState.SUCCEEDED
        and records[i].result is not None
    )
    killed_tasks, resent = sent.sent_by(leader, wanted, mark)
    ledger = rig.ledger.refresh()
    return LeaderKill(
        tasks=burst,
        acked=len(submitter.acked),
        results=results,
        effects=ledger.effects(ids),
        strays=sum(1 for i in ledger.done if i.startswith(f"{prefix}-") and i not in wanted),
        raw_duplicates=sum(ledger.done[i] - 1 for i in ids if ledger.done[i] > 1),
        reruns=sum(ledger.starts[i] - 1 for i in ids if ledger.starts[i] > 1),
        leader=leader,
        successor=successor,
        takeover=took - killed_at,
        seconds=seconds,
        killed_sent=len(killed_tasks),
        killed_resent=len(resent),
        done_at_kill=done_at_kill,
    )


def lease_holder_seen(leaders: Leaders, controllers: Sequence[str]) -> bool:
    return any(name in controllers for _, name in leaders.seen)


@dataclass
class ServerLoss:
    """One phase of "kill -9 a NATS server under load" (or of its return)."""

    phase: str
    server: str
    clients_on_it: list[str]
    """Clients connected to the killed server just before the kill."""
    back_after: float
    """Seconds until every client was connected to a server left (or, for a
    return, until the returned server's replicas were current)."""
    acked: int
    not_acked: int
    results: int
    lost: list[str]
    """Acknowledged tasks without a stored result."""
    missing: list[str]
    """Acknowledged tasks without their effect in the ledger."""
    raw_duplicates: int
    dispatching: int = 0
    """Controllers seen handing tasks to workers after the fault (a stuck one
    would leave the others to carry the load, and no task would be lost)."""


class ClusterLoad:
    """Controllers, a node and its workers on a 3-server cluster, under steady
    task load from a submitter that sits on a chosen server."""

    def __init__(
        self,
        rig: ChaosRig,
        cluster: NatsCluster,
        *,
        controllers: Sequence[str] = ("ctl-a", "ctl-b"),
        workers: int = 3,
        rate: float = 150.0,
        lease_ttl: float = 2.0,
    ) -> None:
        self.rig = rig
        self.cluster = cluster
        self.controllers = controllers
        self.workers = workers
        self.rate = rate
        self.lease_ttl = lease_ttl
        self.expected = {f"controller-{n}" for n in controllers} | {"fabric-node-n1", "op-1"}
        self.expected |= {f"worker-echo-w-{i}" for i in range(workers)}
        self.submitter: Submitter | None = None
        self.submit_nc: Client | None = None
        self.reconnects = 0
        self.sent = Assignments(rig.inboxes)

    async def start(self) -> None:
        """Controllers, the node and its workers, each task type served once."""
        rig = self.rig
        await (await rig.admin()).subscribe("agents.*.tasks", cb=self.sent.on_msg)
        await rig.start_controllers(self.controllers, lease_ttl=self.lease_ttl)
        rig.start_node("n1")
        op = await rig.clients("op-1")
        await rig.deploy_workers(op, replicas=self.workers, concurrency=16)
        await rig.warm_up(TaskClient(op, submitted_by="op-1"), self.workers)

    async def connect_submitter(self, first: NatsServer) -> None:
        """The submitter's connection: to ``first``, then the others in order."""
        others = [s.url for s in self.cluster.servers if s is not first]

        async def on_reconnect() -> None:
            self.reconnects += 1

        self.submit_nc = await self.rig.clients(
            "op-1", [first.url, *others], dont_randomize=True, reconnected_cb=on_reconnect
        )
        tasks = TaskClient(self.submit_nc, submitted_by="op-1")
        self.submitter = Submitter(tasks, concurrency=64, payload={})

    def strays(self) -> set[str]:
        """Effects of tasks never submitted (warm-up aside)."""
        assert self.submitter is not None
        submitted = {*self.submitter.acked, *self.submitter.failed}
        done = self.rig.ledger.refresh().done
        return {i for i in done if not i.startswith("warm-")} - submitted

    def connected(self) -> dict[str, list[str]]:
        """Client names by server name, over the servers running now."""
        pki = self.rig.pki
        return {
            s.settings.server_name: connection_names(s, pki)
            for s in self.cluster.servers
            if s.running
        }

    def everyone_connected(self) -> bool:
        now = self.connected()
        return self.expected <= {n for names in now.values() for n in names}

    def busiest(self, among: Iterable[NatsServer]) -> NatsServer:
        """The server the most of this rig's clients sit on."""
        now = self.connected()
        return max(among, key=lambda s: len(set(now[s.settings.server_name]) & self.expected))

    async def stream_leader(self, stream: str) -> NatsServer:
        js = (await self.rig.admin()).jetstream()
        info = await js.stream_info(stream)
        assert info.cluster is not None and info.config.num_replicas == 3, info
        leader = info.cluster.leader
        return next(s for s in self.cluster.servers if s.settings.server_name == leader)

    async def caught_up(self, server: NatsServer, streams: Sequence[str]) -> bool:
        """``server`` is a current replica, with no lag, of every one of ``streams``."""
        js = (await self.rig.admin()).jetstream()
        name = server.settings.server_name
        for stream in streams:
            try:
                info = await js.stream_info(stream)
            except (nats.errors.Error, TimeoutError):
                return False
            if info.cluster is None:
                return False
            if info.cluster.leader == name:
                continue
            peer = {p.name: p for p in info.cluster.replicas or []}.get(name)
            if peer is None or not peer.current or peer.offline or (peer.lag or 0) > 0:
                return False
        return True

    def done_with(self, prefix: str) -> int:
        return sum(1 for i in self.rig.ledger.refresh().done if i.startswith(f"{prefix}-"))

    async def _settle(self, phase: str, server: NatsServer, prefix: str, **kw: Any) -> ServerLoss:
        """Every acknowledged ``prefix`` task: its effect and its stored result."""
        assert self.submitter is not None
        rig = self.rig
        acked = [i for i in self.submitter.acked if i.startswith(f"{prefix}-")]
        refused = [i for i in self.submitter.failed if i.startswith(f"{prefix}-")]
        with contextlib.suppress(TimeoutError):
            await until(lambda: rig.ledger.refresh().effects(acked) == len(acked), 90, step=0.1)
        records = await settled_records(await rig.admin(), acked)
        lost = [i for i in acked if i not in records or records[i].state is not TaskState.SUCCEEDED]
        ledger = rig.ledger.refresh()
        return ServerLoss(
            phase=phase,
            server=server.settings.server_name,
            acked=len(acked),
            not_acked=len(refused),
            results=len(acked) - len(lost),
            lost=lost,
            missing=[i for i in acked if not ledger.done[i]],
            raw_duplicates=sum(ledger.done[i] - 1 for i in acked if ledger.done[i] > 1),
            **kw,
        )

    async def lose(
        self, server: NatsServer, prefix: str, phase: str = "kill", after: int = 100
    ) -> ServerLoss:
        """Load on; kill -9 ``server``; every client connected again elsewhere;
        ``after`` tasks submitted after the kill take effect; load off; the tally."""
        assert self.submitter is not None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        load = asyncio.create_task(self.submitter.stream(prefix, stop, self.rate))
        try:
            await until(lambda: self.done_with(prefix) >= 100, within=60, step=0.05)
            before = self.connected()
            assert self.everyone_connected(), before
            on_it = sorted(set(before[server.settings.server_name]) & self.expected)
            await server.kill()
            killed_at = loop.time()
            await until(self.everyone_connected, within=30, step=0.1)
            back_after = loop.time() - killed_at
            # Load goes on through the two servers left (new stream, consumer
            # and bucket leaders): tasks submitted after the kill take effect.
            seen = len(self.submitter.acked)
            await until(
                lambda: self.rig.ledger.refresh().effects(self.submitter.acked[seen:]) >= after,  # type: ignore[union-attr]
                within=60 + after / self.rate * 2,
                step=0.1,
            )
            # Every controller dispatches again (seen from here on, load still on).
            mark = len(self.sent.seen)
            with contextlib.suppress(TimeoutError):
                await until(lambda: self.sent.senders_since(mark) >= len(self.controllers), 30)
            dispatching = self.sent.senders_since(mark)
        finally:
            stop.set()
            await load
        return await self._settle(
            phase,
            server,
            prefix,
            clients_on_it=on_it,
            back_after=back_after,
            dispatching=dispatching,
        )

    async def rejoin(self, server: NatsServer, prefix: str, streams: Sequence[str]) -> ServerLoss:
        """Load on; start ``server`` again; until its replicas of ``streams`` are
        current; load off; then the tally."""
        assert self.submitter is not None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        load = asyncio.create_task(self.submitter.stream(prefix, stop, self.rate))
        try:
            await until(lambda: self.done_with(prefix) >= 50, within=60, step=0.05)
            started = loop.time()
            await server.start()
            async with asyncio.timeout(60):
                while not await self.caught_up(server, streams):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # wait-ok: polling replica state under a deadline
            back_after = loop.time() - started
        finally:
            stop.set()
            await load
        return await self._settle("return", server, prefix, clients_on_it=[], back_after=back_after)
