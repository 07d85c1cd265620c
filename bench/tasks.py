"""The task queue benchmark (issue 5): tasks through the whole fabric beside raw
JetStream and beside Celery with a Redis broker.

Run from the repository root::

    python bench/tasks.py [--quick] [--json] [--skip-celery] [--untokened] [--profile DIR]

One run measures, on this machine:

* **fabric**: ``fabric up --port 0`` in a temporary state directory (its TLS
  nats-server, its controller, one ``fabric-node``), exactly as a user starts
  it; a deployment of 4 worker agents (this file run as ``tasks.py worker``,
  a :mod:`fabric.worker` with a handler that returns its payload), placed by
  the controller and spawned by the node agent. The bench submits tasks with
  :meth:`fabric.tasks.client.TaskClient.submit_many` (256 submissions in
  flight, one submit token minted per 1,000 tasks from the operator key) and
  counts ``events.task.completed``: the dispatcher publishes that event after
  the result is stored in KV and before it acks the task. Throughput is
  tasks / (last event - first submission); the run then checks that stream
  ``TASKS`` is empty (every task acked).
* **raw JetStream** (the ceiling), on the same nats-server while the fabric is
  up and idle: a work-queue file stream like ``TASKS``, one consumer process
  (``tasks.py raw-consumer``) with 4 coroutines pulling batches and acking
  each message, the bench publishing with ``publish_async``. No
  envelope, no record, no result, no dispatch hop.
* **Celery** 5 with a Redis broker and result backend, from the bench's own
  venv ``bench/.venv-celery`` (created on first use: ``python -m venv`` and
  ``pip install celery redis packaging``), a Debian ``redis-server`` on a free loopback
  port in a temporary directory (persistence off), ``celery worker -c 4``
  (prefork, default prefetch), the same echo task. The client (a script run
  by the venv's Python) submits with ``delay()`` from 8 threads (one thread
  waits on Redis round trips: 2.6x slower) and timestamps each result
  as the Redis result backend publishes it (``PSUBSCRIBE celery-task-meta-*``).
* **latency**: submissions paced at 10 % of the fabric's measured throughput
  (the same rate for Celery), submit-to-result p50/p99 (fabric: call to
  ``submit`` -> ``events.task.completed`` arrives; Celery: call to
  ``delay`` -> the result's publish arrives).

Each throughput run also reads the CPU time of every process involved and
prints it per task (what other load on the machine moves least). ``--profile
DIR`` records the controller, one worker and the bench with py-spy during the
fabric throughput run; ``--untokened`` runs the fabric with tasks admitted
without submit tokens, to show what checking them costs.

Every process the run starts carries an environment marker; whatever is left
at the end (even after Ctrl-C or an error) is killed by pid. ``--json``
prints the results as JSON instead of the table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import psutil
from _common import ROOT, Marker, machine, pct, render_table, stop_process
from nats.aio.client import Client
from nats.aio.msg import Msg

from fabric.connect import connect

TASK_TYPE = "bench-echo"
DEPLOYMENT = "bench-echo"
WORKERS = 4
RAW_ID = "bench-raw"
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "tasks.bench-raw.raw"
RAW_CONSUMER = "bench-raw"
RAW_PULLERS = 4
RAW_RECORDS = "bench_raw_records"
RAW_EVENTS = "events.bench.raw"
RAW_BATCH = 64
IN_FLIGHT = 256
LATENCY_SHARE = 0.10
CELERY_LANES = 8
VENV = Path(__file__).resolve().parent / ".venv-celery"
HERE = Path(__file__).resolve()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    fabric_tasks: int
    raw_messages: int
    celery_tasks: int
    latency_seconds: float
    warmup: int = 200
    worker_concurrency: int = 16


FULL = Plan(fabric_tasks=20_000, raw_messages=100_000, celery_tasks=20_000, latency_seconds=20)
QUICK = Plan(fabric_tasks=3_000, raw_messages=20_000, celery_tasks=3_000, latency_seconds=5)


@dataclass
class Results:
    fabric_rate: float | None = None
    fabric_submit_rate: float | None = None
    raw_rate: float | None = None
    raw_publish_rate: float | None = None
    raw_writes_rate: float | None = None
    """Raw JetStream plus a stored record and a stored event per message."""
    celery_rate: float | None = None
    celery_submit_rate: float | None = None
    latency_rate: float | None = None
    fabric_latency: list[float] = field(default_factory=list)
    celery_latency: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class CpuMeter:
    """User + system CPU seconds of groups of processes over a window (each process
    itself, not its children; a process gone before the end counts up to its last read)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        for name, pids in groups.items():
            found = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
            self.procs[name] = found
        self.start = {p.pid: self._cpu(p) for ps in self.procs.values() for p in ps}
        self.t0 = time.monotonic()

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            return float(t.user + t.system)
        return 0.0

    def counts(self) -> dict[str, int]:
        return {name: len(ps) for name, ps in self.procs.items()}

    def stop(self) -> tuple[float, dict[str, float]]:
        """(wall seconds, CPU seconds per group)."""
        used = {
            name: sum(max(0.0, self._cpu(p) - self.start[p.pid]) for p in ps)
            for name, ps in self.procs.items()
        }
        return time.monotonic() - self.t0, used


def per_task_cpu(
    wall: float, used: dict[str, float], count: int, procs: dict[str, int] | None = None
) -> dict[str, Any]:
    """CPU per task in microseconds per group, and each group's share of the 2 cores' time."""
    return {
        "us_per_task": {k: round(v / count * 1e6) for k, v in used.items()},
        "cores_busy": {k: round(v / wall, 2) for k, v in used.items()},
        "processes": procs or {},
        "wall_s": round(wall, 3),
    }


# --- the worker agent and the raw consumer (subcommands) ----------------------------


def run_worker(concurrency: int) -> None:
    """``tasks.py worker``: what each of the 4 agents runs (env from the node agent)."""
    from fabric.worker import Worker

    worker = Worker()

    @worker.task(TASK_TYPE, concurrency=concurrency)
    async def echo(_ctx: Any, payload: Any) -> Any:
        return payload

    worker.main()


async def raw_consumer(
    url: str, ca: str, cert: str, key: str, count: int, writes: bool = False
) -> None:
    """``tasks.py raw-consumer``: pull and ack ``count`` messages, then print when.

    ``writes``: before acking a fetched batch, store for each message what the
    issue asks a dispatcher to store (a record in a KV bucket, then a
    CloudEvent-sized event), through the cheapest nats-py way there is: back to
    back publishes with their PubAcks on one subscription (StoredPublisher).
    """
    from fabric.tasks.pipe import StoredPublisher

    nc = await connect(url, ca=Path(ca), cert=Path(cert), key=Path(key), name="bench-raw-consumer")
    js = nc.jetstream()
    done = asyncio.Event()
    seen = 0
    pipe = StoredPublisher(nc)
    await pipe.start()
    record = b'{"state":"succeeded","result":' + b"x" * 300 + b"}"
    event = b'{"specversion":"1.0","type":"io.agent-fabric.task.completed",' + b"x" * 380 + b"}"

    async def store(msgs: list[Any]) -> None:
        seqs = [msg.metadata.sequence.stream for msg in msgs]
        recs = [(f"$KV.{RAW_RECORDS}.r{n}", record, None) for n in seqs]
        evs = [(RAW_EVENTS, event, {"Nats-Msg-Id": f"raw-{n}"}) for n in seqs]
        for outcome in [*await pipe.write_many(recs), *await pipe.write_many(evs)]:
            if isinstance(outcome, Exception):
                raise outcome

    async def puller() -> None:
        # One pull subscription each: concurrent fetches on one subscription share
        # its inbox and steal each other's messages.
        nonlocal seen
        psub = await js.pull_subscribe_bind(
            durable=RAW_CONSUMER, stream=RAW_STREAM, pending_msgs_limit=0
        )
        while not done.is_set():
            try:
                msgs = await psub.fetch(RAW_BATCH, timeout=1.0)
            except TimeoutError:
                continue
            if writes:
                await store(msgs)
            for msg in msgs:
                await msg.ack()
                seen += 1
            if seen >= count:
                done.set()

    print("ready", flush=True)
    pullers = [asyncio.create_task(puller()) for _ in range(RAW_PULLERS)]
    await done.wait()
    await nc.flush()
    end = time.monotonic()
    print(f"done {end!r} {seen}", flush=True)
    for task in pullers:
        task.cancel()
    await asyncio.gather(*pullers, return_exceptions=True)
    await pipe.stop()
    await nc.close()


# --- fabric -------------------------------------------------------------------------


class _Event(msgspec.Struct):
    subject: str = ""


class Succeeded:
    """``events.task.completed``: arrival time per task id, and a wait for a set of ids."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._want: set[str] = set()
        self._all = asyncio.Event()
        self._decoder = msgspec.json.Decoder(_Event)

    async def handle(self, msg: Msg) -> None:
        now = time.monotonic()
        task_id = self._decoder.decode(msg.data).subject
        self.at.setdefault(task_id, now)
        if self._want:
            self._want.discard(task_id)
            if not self._want:
                self._all.set()

    async def wait_all(self, ids: Sequence[str], within: float) -> None:
        self._want = {i for i in ids if i not in self.at}
        self._all.clear()
        if not self._want:
            return
        try:
            async with asyncio.timeout(within):
                await self._all.wait()
        except TimeoutError:
            missing = len(self._want)
            raise RuntimeError(
                f"{missing} of {len(ids)} tasks not done within {within:g} s"
            ) from None


class FabricUp:
    """``fabric up`` as a subprocess in a temporary state directory."""

    def __init__(self, untokened: bool = False) -> None:
        self.untokened = untokened
        self.dir = Path(tempfile.mkdtemp(prefix="fabric-bench-tasks-"))
        self.log = self.dir / "fabric-up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from fabric.pki import issue_identity
        from fabric.up import prepare_pki

        # The PKI fabric up would make, plus a controller-role identity for the raw
        # JetStream client (the server's users are the inventory at start).
        pki = self.dir / "pki"
        prepare_pki(pki, 1)
        issue_identity(pki, "controller", RAW_ID)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
        up = [str(HERE), "up-untokened"] if self.untokened else ["-m", "fabric", "up"]
        argv = [sys.executable, *up, "--state-dir", str(self.dir), "--port", "0"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def ready(self, within: float = 60) -> None:
        env_file = self.dir / "fabric.env"
        deadline = time.monotonic() + within
        while not env_file.exists():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"fabric up exited:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fabric up not ready after {within:g} s:\n{_tail(self.log)}")
            await asyncio.sleep(0.1)

    def child_pid(self, *words: str) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmd = child.cmdline()
                    if all(w in cmd for w in words):
                        return int(child.pid)
        return None

    def groups(self) -> dict[str, list[int]]:
        """The processes of the fabric by part, and this bench (the submitter)."""
        groups: dict[str, list[int]] = {
            "controller": [],
            "workers": [],
            "nats-server": [],
            "node agent": [],
            "bench client": [os.getpid()],
        }
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(child.cmdline())
                    if "controller run" in cmd:
                        groups["controller"].append(child.pid)
                    elif f"{HERE} worker" in cmd:
                        groups["workers"].append(child.pid)
                    elif "nats-server" in cmd:
                        groups["nats-server"].append(child.pid)
                    elif "node_agent.main" in cmd:
                        groups["node agent"].append(child.pid)
        return groups

    def stop(self) -> int | None:
        try:
            return None if self.proc is None else stop_process(self.proc, 60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


async def deploy_workers(client: Any, concurrency: int, within: float = 60) -> None:
    from schemas.agent import AgentSpec, AgentState, AgentStatus
    from schemas.api import CreateDeployment, Deployment
    from schemas.codec import decode

    ids = {f"{DEPLOYMENT}-{i}" for i in range(WORKERS)}
    up: set[str] = set()
    all_up = asyncio.Event()

    async def on_status(msg: Msg) -> None:
        status = decode(msg.data, AgentStatus)
        if status.agent_id in ids and status.state is AgentState.RUNNING:
            up.add(status.agent_id)
            if up == ids:
                all_up.set()

    sub = await client.nc.subscribe("agents.*.status", cb=on_status)
    await client.nc.flush()
    spec = AgentSpec(
        name=DEPLOYMENT,
        argv=[sys.executable, str(HERE), "worker", "--concurrency", str(concurrency)],
        capabilities=[TASK_TYPE],
        start_seconds=0,
        stop_timeout=5,
    )
    await client.api("create", CreateDeployment(deployment=Deployment(spec=spec, replicas=WORKERS)))
    try:
        async with asyncio.timeout(within):
            await all_up.wait()
    finally:
        await sub.unsubscribe()


def up_untokened(argv: list[str]) -> int:
    """``tasks.py up-untokened ARGS``: ``fabric up ARGS`` whose controller admits tasks
    without a submit token (``--allow-untokened-tasks``), to measure what the checks cost."""
    from fabric import up
    from fabric.cli import main as fabric_main

    make_child = up.LocalFabric._controller_child

    def controller_child(self: up.LocalFabric) -> up.Child:
        child = make_child(self)
        child.argv.append("--allow-untokened-tasks")
        return child

    up.LocalFabric._controller_child = controller_child  # type: ignore[method-assign]
    return fabric_main(["up", *argv])


async def run_fabric(
    plan: Plan, res: Results, profile: Path | None, untokened: bool = False
) -> None:
    from fabric.client import open_client
    from fabric.tasks.client import NewTask, Submitted, TaskClient, new_task_id
    from fabric.tasks.stream import TASKS_STREAM
    from fabric.tokens import TokenIssuer

    fab = FabricUp(untokened)
    log(f"fabric up in {fab.dir}{' (tasks admitted without tokens)' if untokened else ''}")
    fab.start()
    try:
        await fab.ready()
        res.extra["fabric_controller_pid"] = fab.child_pid("controller", "run")
        res.extra["fabric_node_pid"] = fab.child_pid("node_agent.main")
        async with open_client(state_dir=fab.dir, name="bench-tasks") as client:
            nc: Client = client.nc
            done = Succeeded()
            await nc.subscribe("events.task.completed", cb=done.handle)
            await nc.flush()
            log(f"deploying {WORKERS} worker agents")
            await deploy_workers(client, plan.worker_concurrency)
            # Minted from the operator key as the CLI does, but one token (scope
            # tasks:submit, max_tasks 1,000) for many tasks: the client signs, and the
            # controller verifies, once per thousand tasks.
            key = client.env.token_key
            issuer = None if untokened or key is None else TokenIssuer.from_file(key, "bench")
            tasks = TaskClient(nc, submitted_by=client.subject, issuer=issuer)
            js = nc.jetstream()

            log(f"warm-up: {plan.warmup} tasks")
            ids = [(await tasks.submit(TASK_TYPE, {"i": i})).task.id for i in range(plan.warmup)]
            await done.wait_all(ids, within=120)

            await run_raw(plan, res, fab)
            await run_raw(plan, res, fab, writes=True)

            log(f"fabric: {plan.fabric_tasks} tasks, {IN_FLIGHT} submissions in flight")
            made = [new_task_id() for _ in range(plan.fabric_tasks)]
            batch = [NewTask(TASK_TYPE, {"i": i}, id=task_id) for i, task_id in enumerate(made)]

            groups = fab.groups()
            spies = start_profilers(profile, groups)
            meter = CpuMeter(groups)
            t0 = time.monotonic()
            outcomes = await tasks.submit_many(batch, window=IN_FLIGHT)
            t_sub = time.monotonic()
            failed = [o for o in outcomes if not isinstance(o, Submitted)]
            if failed:
                raise RuntimeError(f"{len(failed)} submissions failed, the first: {failed[0]!r}")
            await done.wait_all(made, within=600)
            last = max(done.at[i] for i in made)
            res.extra["fabric_cpu"] = per_task_cpu(*meter.stop(), plan.fabric_tasks, meter.counts())
            stop_profilers(spies)
            res.fabric_rate = plan.fabric_tasks / (last - t0)
            res.fabric_submit_rate = plan.fabric_tasks / (t_sub - t0)
            async with asyncio.timeout(30):
                while (await js.stream_info(TASKS_STREAM)).state.messages:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            res.extra["fabric_tasks_stream_empty_after_s"] = round(time.monotonic() - last, 3)

            rate = res.fabric_rate * LATENCY_SHARE
            res.latency_rate = rate
            n = max(50, int(rate * plan.latency_seconds))
            log(f"fabric latency: {n} tasks at {rate:.0f}/s")
            res.fabric_latency = await paced_fabric(tasks, done, rate, n)
    except BaseException:
        for name in ("fabric-up.log", "logs/controller-1.log", "logs/local-1.log"):
            log(f"--- {name}:\n{_tail(fab.dir / name)}")
        raise
    finally:
        code = await asyncio.to_thread(fab.stop)
        res.extra["fabric_up_exit_code"] = code


def start_profilers(
    out: Path | None, groups: dict[str, list[int]]
) -> list[subprocess.Popen[bytes]]:
    """py-spy on the controller, one worker and this bench while the throughput runs."""
    if out is None:
        return []
    spy = shutil.which("py-spy") or str(VENV / "bin" / "py-spy")
    if not Path(spy).exists():
        raise RuntimeError(f"--profile needs py-spy: {VENV}/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for name in ("controller", "workers", "bench client"):
        for pid in groups[name][:1]:
            argv = [spy, "record", "--nonblocking", "-r", "500", "-f", "raw", "-p", str(pid)]
            argv += ["-o", str(out / f"{name.replace(' ', '-')}.folded")]
            spies.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
    time.sleep(0.5)  # attached
    return spies


# Where a profiled process's samples go: the first rule whose frame names appear in a
# stack takes the sample (py-spy --nonblocking samples what is on CPU or in a syscall).
PROFILE_RULES = [
    ("task admission: submit token checks (a signature per new token)", ["admission.py"]),
    ("nats-py _flusher: socket writes (TLS)", ["Client._flusher"]),
    ("KV create: record 'running' (RecordStore.claim)", ["RecordStore.claim"]),
    ("KV update: record 'succeeded' (RecordStore.save)", ["RecordStore.save"]),
    ("nc.request: to the worker (controller), PubAck (client)", ["Client.request "]),
    ("event publish", ["Dispatcher._event"]),
    ("ack / nak / in_progress", ["Msg.ack ", "Msg.nak ", "Msg.in_progress "]),
    ("fetch", ["PullSubscription.fetch"]),
    ("reading: TLS, parse, message dispatch", ["_read_ready", "Parser.parse"]),
    ("worker: serve and answer", ["Worker._serve", "Worker._on_assignment", "Worker._answer"]),
    ("TaskClient.submit / submit_many (incl. token mint)", ["TaskClient.submit"]),
    ("waiting in select", ["EpollSelector.select"]),
]


def summarize_profile(path: Path, top: int = 10) -> list[tuple[str, float]]:
    """Shares of a py-spy raw (folded) profile by :data:`PROFILE_RULES`."""
    shares: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        name = next(
            (name for name, keys in PROFILE_RULES if any(k in stack for k in keys)),
            "other (asyncio, decode, dispatcher logic)",
        )
        shares[name] = shares.get(name, 0) + int(n)
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])[:top]
    return [(name, n / total) for name, n in ranked] if total else []


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


async def paced_fabric(tasks: Any, done: Succeeded, rate: float, n: int) -> list[float]:
    from fabric.tasks.client import new_task_id

    made = [new_task_id() for _ in range(n)]
    sent: dict[str, float] = {}
    pending: list[asyncio.Task[Any]] = []
    t0 = time.monotonic()
    for i, task_id in enumerate(made):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[task_id] = time.monotonic()
        pending.append(asyncio.create_task(tasks.submit(TASK_TYPE, {"i": i}, task_id=task_id)))
    await asyncio.gather(*pending)
    await done.wait_all(made, within=120)
    return [done.at[i] - sent[i] for i in made]


# --- raw JetStream --------------------------------------------------------------------


async def run_raw(plan: Plan, res: Results, fab: FabricUp, *, writes: bool = False) -> None:
    """Raw JetStream on the fabric's server; ``writes``: with a stored record and a
    stored event per message before its ack (see :func:`raw_consumer`)."""
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        KeyValueConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )

    from fabric.env import find_fabric

    env = find_fabric(fab.dir)
    pki = fab.dir / "pki"
    cert, key = pki / f"{RAW_ID}.crt", pki / f"{RAW_ID}.key"
    nc = await connect(env.url, ca=env.ca, cert=cert, key=key, name="bench-raw-publisher")
    js = nc.jetstream()
    consumer: subprocess.Popen[bytes] | None = None
    try:
        await js.add_stream(
            StreamConfig(
                name=RAW_STREAM,
                subjects=[RAW_SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        await js.add_consumer(
            RAW_STREAM,
            ConsumerConfig(
                durable_name=RAW_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=20_000,
            ),
        )
        count = plan.raw_messages if not writes else plan.fabric_tasks
        if writes:
            await js.create_key_value(KeyValueConfig(bucket=RAW_RECORDS, history=1))
        argv = [sys.executable, str(HERE), "raw-consumer", env.url, str(env.ca), str(cert)]
        argv += [str(key), str(count), *(["--writes"] if writes else [])]
        consumer = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)  # noqa: ASYNC220
        assert consumer.stdout is not None
        line = await asyncio.to_thread(consumer.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"raw consumer did not start: {line!r}")
        what = "with a stored record and event each" if writes else "publish_async"
        log(f"raw JetStream: {count} messages, {what}")
        body = b'{"i": 0}'
        server = fab.groups()["nats-server"]
        meter = CpuMeter(
            {"consumer": [consumer.pid], "nats-server": server, "bench client": [os.getpid()]}
        )
        t0 = time.monotonic()
        acks = [await js.publish_async(RAW_SUBJECT, body) for _ in range(count)]
        await asyncio.gather(*acks)
        t_pub = time.monotonic()
        async with asyncio.timeout(300):
            line = await asyncio.to_thread(consumer.stdout.readline)
        word, end, seen = line.decode().split()
        assert word == "done", line
        cpu = per_task_cpu(*meter.stop(), count, meter.counts())
        rate = int(seen) / (float(end) - t0)
        if writes:
            res.extra["raw_writes_cpu"] = cpu
            res.raw_writes_rate = rate
            await js.delete_key_value(RAW_RECORDS)
        else:
            res.extra["raw_cpu"] = cpu
            res.raw_rate = rate
            res.raw_publish_rate = count / (t_pub - t0)
        await js.delete_stream(RAW_STREAM)
    finally:
        if consumer is not None:
            await asyncio.to_thread(stop_process, consumer, 5)
            if consumer.stdout is not None:
                consumer.stdout.close()
        await nc.close()


# --- Celery + Redis -----------------------------------------------------------------

CELERY_APP = '''\
"""Generated by bench/tasks.py: the Celery app both the worker and the client load."""
import os

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="echo")
def echo(payload):
    return payload
'''

CELERY_CLIENT = '''\
"""Generated by bench/tasks.py: submits echo tasks and timestamps their results.

    client.py throughput N LANES        -> {"t0", "t_submitted", "t_last", "n"}
    client.py latency N LANES RATE      -> {"latency": [seconds, ...]}

A result counts when the Redis result backend publishes it (it SETs the key
and PUBLISHes it on the channel of the same name): PSUBSCRIBE on
celery-task-meta-* in a thread, time.monotonic() on arrival.
"""
import json
import os
import sys
import threading
import time

import redis

from bench_celery import app, echo

PREFIX = "celery-task-meta-"


class Results:
    def __init__(self):
        self.at = {}
        self.want = None
        self.all = threading.Event()
        self.lock = threading.Lock()
        # Kept: a collected Redis client closes its pool, the PubSub's connection too.
        self.redis = redis.Redis.from_url(os.environ["BENCH_REDIS"])
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(PREFIX + "*")
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.thread.start()

    def listen(self):
        for msg in self.pubsub.listen():
            now = time.monotonic()
            if msg["type"] != "pmessage":
                continue
            task_id = msg["channel"].decode()[len(PREFIX):]
            with self.lock:
                self.at.setdefault(task_id, now)
                if self.want and task_id in self.want:
                    self.want.discard(task_id)
                    if not self.want:
                        self.all.set()

    def expect(self, ids):
        with self.lock:
            self.all.clear()
            self.want = {i for i in ids if i not in self.at}
            if not self.want:
                self.all.set()

    def wait(self, within):
        if not self.all.wait(within):
            raise SystemExit(f"{len(self.want)} results missing after {within} s")


def submit(n, rate, lanes):
    """delay() n tasks from `lanes` threads (serial delay() waits on Redis round
    trips), paced at `rate` per second (None: as fast as they go); {id: time}."""
    sent = {}
    t0 = time.monotonic()

    def lane(k):
        for i in range(k, n, lanes):
            if rate is not None:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            at = time.monotonic()
            sent[echo.delay({"i": i}).id] = at

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def main():
    mode, n, lanes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    results = Results()
    time.sleep(0.2)  # the PSUBSCRIBE is in place
    # warm up: connections, the worker's pool
    results.expect(list(submit(100, None, lanes)))
    results.wait(60)
    if mode == "throughput":
        t0 = time.monotonic()
        sent = submit(n, None, lanes)
        t_sub = time.monotonic()
        results.expect(list(sent))
        results.wait(900)
        print(json.dumps({"t0": t0, "t_submitted": t_sub,
                          "t_last": max(results.at[i] for i in sent), "n": n}))
    else:
        sent = submit(n, float(sys.argv[4]), lanes)
        results.expect(list(sent))
        results.wait(300)
        print(json.dumps({"latency": [results.at[i] - t for i, t in sent.items()]}))


main()
'''


def ensure_celery() -> tuple[Path, str]:
    """Python of the bench's Celery venv, created and filled on first use; its versions."""
    python = VENV / "bin" / "python"
    # kombu 5.7's Redis transport imports `packaging` without declaring it.
    probe = (
        "import celery, redis, kombu.transport.redis; print(celery.__version__, redis.__version__)"
    )
    if not (VENV / "bin" / "celery").exists():
        log(f"creating {VENV} and installing celery and redis (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "celery", "redis", "packaging"],
            check=True,
        )
    version = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return python, f"Celery {version[0]}, redis-py {version[1]}"


def ensure_redis() -> Path:
    """Debian's redis-server; installed with apt-get when missing and we are root."""
    found = shutil.which("redis-server")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing redis-server from Debian's packages")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=False, **quiet)  # type: ignore[call-overload]
        if shutil.which("redis-server") is None:
            subprocess.run(["apt-get", "update"], check=False, **quiet)  # type: ignore[call-overload]
            subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, **quiet)  # type: ignore[call-overload]
        found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: apt-get install redis-server")
    return Path(found)


def run_celery(plan: Plan, res: Results, rate: float | None) -> None:
    python, res.extra["celery_versions"] = ensure_celery()
    redis_exe = ensure_redis()
    res.extra["redis_version"] = (
        subprocess.run([str(redis_exe), "--version"], capture_output=True, text=True, check=True)
        .stdout.split()[2]
        .removeprefix("v=")
    )
    tmp = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    redis_proc: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        redis_argv = [str(redis_exe), "--bind", "127.0.0.1", "--port", str(port)]
        redis_argv += ["--dir", str(tmp), "--save", "", "--appendonly", "no", "--daemonize", "no"]
        with (tmp / "redis.log").open("ab") as out:
            redis_proc = subprocess.Popen(
                redis_argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if redis_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{_tail(tmp / 'redis.log')}")
            time.sleep(0.05)
        (tmp / "bench_celery.py").write_text(CELERY_APP)
        (tmp / "client.py").write_text(CELERY_CLIENT)
        env = {**os.environ, "BENCH_REDIS": f"redis://127.0.0.1:{port}/0", "PYTHONPATH": str(tmp)}
        wlog = tmp / "worker.log"
        worker_argv = [str(VENV / "bin" / "celery"), "-A", "bench_celery", "worker"]
        worker_argv += ["-c", str(WORKERS), "-P", "prefork", "-l", "info", "-n", "bench@localhost"]
        res.extra["celery_worker_argv"] = " ".join(worker_argv[1:])
        with wlog.open("ab") as out:
            worker = subprocess.Popen(
                worker_argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        while "ready." not in wlog.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{_tail(wlog)}")
            time.sleep(0.1)

        def client(*args: str, timeout: float) -> dict[str, Any]:
            out = subprocess.run(
                [str(python), str(tmp / "client.py"), *args],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if out.returncode != 0:
                raise RuntimeError(f"celery client failed: {out.stderr[-2000:]}")
            return dict(json.loads(out.stdout.strip().splitlines()[-1]))

        log(f"celery: {plan.celery_tasks} tasks, worker -c {WORKERS}")
        pool = [c.pid for c in psutil.Process(worker.pid).children(recursive=True)]
        meter = CpuMeter(
            {
                "celery worker (main)": [worker.pid],
                f"celery pool ({len(pool)} procs)": pool,
                "redis-server": [redis_proc.pid],
            }
        )
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        got = client("throughput", str(plan.celery_tasks), str(CELERY_LANES), timeout=900)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, used = meter.stop()
        # The client ran to its end as our child: its CPU is in RUSAGE_CHILDREN
        # (including its 100 warm-up tasks and its start-up).
        used["client (incl. start-up)"] = (ru1.ru_utime - ru0.ru_utime) + (
            ru1.ru_stime - ru0.ru_stime
        )
        counts = {**meter.counts(), "client (incl. start-up)": 1}
        res.extra["celery_cpu"] = per_task_cpu(wall, used, plan.celery_tasks, counts)
        res.celery_rate = got["n"] / (got["t_last"] - got["t0"])
        res.celery_submit_rate = got["n"] / (got["t_submitted"] - got["t0"])
        if rate is not None:
            n = max(50, int(rate * plan.latency_seconds))
            log(f"celery latency: {n} tasks at {rate:.0f}/s")
            got = client("latency", str(n), str(CELERY_LANES), repr(rate), timeout=600)
            res.celery_latency = got["latency"]
    finally:
        if worker is not None:
            stop_process(worker, 30)
        if redis_proc is not None:
            stop_process(redis_proc, 10)
        shutil.rmtree(tmp, ignore_errors=True)


# --- report ---------------------------------------------------------------------------

HEADERS = ["figure", "fabric", "raw JetStream", "Celery + Redis", "target", "verdict"]


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f} /s"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f} ms"


def _p(xs: list[float], p: float) -> float | None:
    return pct(xs, p) if xs else None


def _writes_verdict(fab: float | None, raw: float | None, writes: float | None) -> str:
    """Where the writes alone put the ceiling, and how near the fabric comes to it."""
    if writes is None:
        return "-"
    parts = [] if raw is None else [f"this ceiling is {writes / raw:.0%} of raw"]
    if fab is not None:
        parts.append(f"fabric {fab / writes:.0%} of it")
    return "; ".join(parts) or "-"


def table(plan: Plan, res: Results) -> list[list[str]]:
    fab, raw, cel = res.fabric_rate, res.raw_rate, res.celery_rate
    verdicts = []
    if fab is not None and raw is not None:
        share = fab / raw
        verdicts.append(f"{'PASS' if share >= 0.5 else 'MISS'}: {share:.0%} of raw")
    if fab is not None and cel is not None:
        ratio = fab / cel
        verdicts.append(f"{'PASS' if ratio > 1 else 'MISS'}: {ratio:.1f}x Celery")
    rate = res.latency_rate
    at = "n/a" if rate is None else f"{rate:,.0f}/s"
    rows = [
        [
            f"throughput, trivial task, {WORKERS} workers (fabric {plan.fabric_tasks:,}, "
            f"raw {plan.raw_messages:,}, Celery {plan.celery_tasks:,})",
            _rate(fab),
            _rate(raw),
            _rate(cel),
            ">= 50 % of raw; > Celery",
            "; ".join(verdicts) or "-",
        ],
        [
            "raw JetStream + per message a stored KV record and a stored event before the ack "
            f"({plan.fabric_tasks:,}; the writes the issue requires, PubAcks pipelined)",
            _rate(fab),
            _rate(res.raw_writes_rate),
            "-",
            "-",
            _writes_verdict(fab, raw, res.raw_writes_rate),
        ],
        [
            "submission rate (same runs)",
            _rate(res.fabric_submit_rate),
            _rate(res.raw_publish_rate),
            _rate(res.celery_submit_rate),
            "-",
            "-",
        ],
    ]
    for p in (50, 99):
        f, c = _p(res.fabric_latency, p), _p(res.celery_latency, p)
        verdict = "-"
        if f is not None and c is not None:
            ratio = c / f if f else float("inf")
            if ratio >= 1.05:
                verdict = f"{ratio:.1f}x better than Celery"
            elif ratio <= 1 / 1.05:
                verdict = f"{1 / ratio:.1f}x worse than Celery"
            else:
                verdict = "on par with Celery"
        n = len(res.fabric_latency)
        rows.append(
            [
                f"submit -> result p{p}, paced at {at} (10 % of fabric peak; {n} tasks)",
                _ms(f),
                "-",
                _ms(c),
                "-",
                verdict,
            ]
        )
    return rows


NOTES = [
    "fabric: `fabric up --port 0` (TLS nats-server, controller, 1 fabric-node) in a temp dir; "
    f"deployment of {WORKERS} agents (`bench/tasks.py worker`, fabric.worker, echo handler); "
    f"TaskClient.submit_many, {IN_FLIGHT} in flight, one submit token per 1,000 tasks; "
    "done = events.task.completed "
    "(published after the KV result, before the ack); stream TASKS checked empty after.",
    "raw JetStream: same server, work-queue file stream, js.publish_async from the bench "
    f"(nats-py's window of pending acks), one consumer process, {RAW_PULLERS} pull coroutines "
    f"(batch {RAW_BATCH}), msg.ack() each; no envelope, no record, no dispatch hop.",
    "raw + writes: the same, the consumer storing for each fetched message a KV record "
    f"(bucket {RAW_RECORDS}, ~330 B) and then an event ({RAW_EVENTS} into EVENTS, ~450 B, "
    "Nats-Msg-Id), PubAcks gathered on one subscription, before acking: what any design "
    "storing the issue's result and event per task pays, with no dispatch, token or worker.",
    "Celery: redis-server (persistence off) on loopback, `celery worker -c 4 -P prefork` "
    f"(default prefetch, acks early), client submits with delay() from {CELERY_LANES} threads; "
    "done = the result backend's PUBLISH of the result, seen by PSUBSCRIBE.",
    "latency: paced submissions at 10 % of the fabric's measured throughput, same rate for Celery.",
]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["worker"]:
        sub = argparse.ArgumentParser(prog="tasks.py worker")
        sub.add_argument("--concurrency", type=int, default=16)
        run_worker(sub.parse_args(args_list[1:]).concurrency)
        return 0
    if args_list[:1] == ["up-untokened"]:
        return up_untokened(args_list[1:])
    if args_list[:1] == ["raw-consumer"]:
        url, ca, cert, key, count = args_list[1:6]
        writes = args_list[6:7] == ["--writes"]
        asyncio.run(raw_consumer(url, ca, cert, key, int(count), writes))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, under a minute")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--skip-celery", action="store_true", help="fabric and raw only")
    parser.add_argument(
        "--untokened",
        action="store_true",
        help="submit without tokens, the controller started with --allow-untokened-tasks "
        "(what checking submit tokens costs)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy (raw folded stacks) of the controller, a worker and the bench client "
        "during the fabric throughput run, into DIR",
    )
    args = parser.parse_args(args_list)
    plan = QUICK if args.quick else FULL

    def interrupted(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    marker = Marker()
    marker.install()
    info = machine()
    res = Results()
    started = time.monotonic()
    try:
        try:
            asyncio.run(run_fabric(plan, res, args.profile, args.untokened))
            if not args.skip_celery:
                run_celery(plan, res, res.latency_rate)
        except KeyboardInterrupt:
            log("interrupted; what this run started is stopped")
            return 130
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        left = marker.sweep()
        if left:
            log(f"killed {len(left)} leftover process(es): {left}")
    res.extra["leftover_processes_killed"] = len(left)
    res.extra["wall_seconds"] = round(time.monotonic() - started, 1)
    rows = table(plan, res)
    if args.json:
        out = {
            "machine": info,
            "quick": args.quick,
            "untokened": args.untokened,
            "plan": plan.__dict__,
            "fabric_tasks_per_s": res.fabric_rate,
            "fabric_submit_per_s": res.fabric_submit_rate,
            "raw_jetstream_per_s": res.raw_rate,
            "raw_publish_per_s": res.raw_publish_rate,
            "raw_with_writes_per_s": res.raw_writes_rate,
            "celery_tasks_per_s": res.celery_rate,
            "celery_submit_per_s": res.celery_submit_rate,
            "latency_rate_per_s": res.latency_rate,
            "fabric_latency_ms": {
                f"p{p}": None if (v := _p(res.fabric_latency, p)) is None else v * 1e3
                for p in (50, 99)
            },
            "celery_latency_ms": {
                f"p{p}": None if (v := _p(res.celery_latency, p)) is None else v * 1e3
                for p in (50, 99)
            },
            "rows": [dict(zip(HEADERS, r, strict=True)) for r in rows],
            "extra": res.extra,
            "notes": NOTES,
        }
        print(json.dumps(out, indent=2))
        return 0
    given = (("--quick", args.quick), ("--untokened", args.untokened))
    flags = " ".join(flag for flag, on in given if on)
    print(
        f"tasks bench{f' ({flags})' if flags else ''}: {info['date']}, nproc {info['nproc']}, "
        f"Python {info['python']}, kernel {info['kernel']}, "
        f"{res.extra.get('celery_versions', 'Celery not run')}, "
        f"redis-server {res.extra.get('redis_version', '-')}, "
        f"1-min load avg {info['loadavg'][0]} at start, "
        f"{info.get('loadavg_at_end', ['?'])[0]} at end; {res.extra['wall_seconds']} s"
    )
    print()
    print(render_table(HEADERS, rows))
    print()
    for note in NOTES:
        print(f"- {note}")
    checks = {
        k: res.extra.get(k)
        for k in (
            "fabric_tasks_stream_empty_after_s",
            "fabric_up_exit_code",
            "leftover_processes_killed",
        )
    }
    bounds = []
    runs = (
        ("fabric_cpu", "fabric"),
        ("raw_cpu", "raw"),
        ("raw_writes_cpu", "raw + writes"),
        ("celery_cpu", "Celery"),
    )
    for key, what in runs:
        cpu = res.extra.get(key)
        if cpu:
            parts = ", ".join(
                f"{k} {v} us ({cpu['cores_busy'][k]} cores)" for k, v in cpu["us_per_task"].items()
            )
            print(f"- CPU per task, {what} throughput run: {parts}")
            us = cpu["us_per_task"]
            single = {k: v for k, v in us.items() if cpu["processes"].get(k) == 1}
            total, (busiest, most) = sum(us.values()), max(single.items(), key=lambda kv: kv[1])
            if total and most:
                bounds.append(
                    f"{what} {total} us in all (<= {2e6 / total:,.0f}/s on 2 idle cores), "
                    f"busiest process: {busiest} {most} us (<= {1e6 / most:,.0f}/s on one core)"
                )
    if bounds:
        print(f"- CPU bounds, independent of what else ran: {'; '.join(bounds)}")
    print(f"- checks: {', '.join(f'{k}={v}' for k, v in checks.items())}")
    if args.profile is not None:
        for name in ("controller", "workers", "bench-client"):
            path = args.profile / f"{name}.folded"
            if path.exists():
                shares = summarize_profile(path)
                text = "; ".join(f"{what} {share:.0%}" for what, share in shares)
                print(f"- py-spy, {name} ({path}): {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
