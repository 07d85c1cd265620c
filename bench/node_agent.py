"""The node agent benchmark (issue 3): ``fabric-node`` over NATS beside supervisord.

Run from the repository root::

    python bench/node_agent.py [--quick] [--json]

One run measures, on this machine, the same operations on both systems:

* fabric: a real TLS nats-server (throwaway PKI) and a real ``fabric-node``
  process (``python -m node_agent.main ... --metrics-interval 5``), driven by
  an operator client over NATS with signed tokens. An agent counts as
  RUNNING (or STOPPED) when a NATS subscriber on ``agents.*.status``,
  subscribed before acting, sees that status.
* supervisord 4.x, installed on first use into ``bench/.venv-supervisor``
  (``python -m venv`` + ``pip install supervisor``), run with ``-n`` from a
  generated config, driven over XML-RPC on its unix socket. Its API has no
  events, so RUNNING (or STOPPED) is what ``getProcessInfo`` /
  ``getAllProcessInfo`` report, polled every 1 ms (5-20 ms for groups).

Same settings on both sides: start_seconds=0 / startsecs=0, restart always
with no backoff / autorestart=true, stop_timeout=2 / stopwaitsecs=2, the
whole process group signalled on stop (the fabric always does;
stopasgroup=true for supervisord). Idle agents are ``/bin/sleep 3600``;
TERM-ignoring ones ``/bin/sh -c "trap '' TERM; while :; do sleep 1; done"``.

Every process the run starts carries an environment marker; whatever is left
at the end (even after Ctrl-C or an error) is killed by pid. ``--json``
prints the results as JSON instead of the table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from _common import (
    ROOT,
    ZERO_BACKOFF,
    Marker,
    fabric_stack,
    machine,
    pct,
    render_table,
    stop_process,
)
from nats.aio.client import Client
from nats.aio.msg import Msg

from fabric.connect import connect
from fabric.tokens import TokenIssuer
from node_agent.cgroup import find_cgroup2_mount, own_cgroup_path
from schemas import subjects
from schemas.agent import AgentSpec, AgentState, AgentStatus
from schemas.codec import decode, decode_reply, encode
from schemas.command import CommandResult, PlaceAgent, RemoveAgent, StopAgent
from schemas.errors import ErrorReply

NODE_ID = "bench-node"
OPERATOR = "bench-op"
SLEEP = ["/bin/sleep", "3600"]
IGNORE_TERM = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"]
GRACE = 2.0
METRICS_INTERVAL = 5.0
WARMUP = 3
VENV = Path(__file__).resolve().parent / ".venv-supervisor"


# Set when the run ends early (Ctrl-C, SIGTERM, error): supervisord figures run in a
# worker thread, which checks it between calls and gives up.
INTERRUPT = threading.Event()


class Interrupted(Exception):
    pass


def check_interrupt() -> None:
    if INTERRUPT.is_set():
        raise Interrupted("benchmark interrupted")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    spawn_runs: int
    crash_runs: int
    idle_seconds: float
    many: tuple[int, int] = (100, 1000)
    stop_agents: int = 100


FULL = Plan(spawn_runs=200, crash_runs=20, idle_seconds=60)
QUICK = Plan(spawn_runs=50, crash_runs=10, idle_seconds=15)


@dataclass
class Side:
    """What one system measured (seconds, bytes, fractions of a core)."""

    spawn: list[float] = field(default_factory=list)
    crash: list[float] = field(default_factory=list)
    many: dict[int, float | None] = field(default_factory=dict)
    many_note: dict[int, str] = field(default_factory=dict)
    stop: float | None = None
    stop_killed: int | None = None
    cpu: float | None = None
    rss: int | None = None
    idle_agents: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- fabric --------------------------------------------------------------------


def agent_spec(name: str, argv: list[str]) -> AgentSpec:
    return AgentSpec(
        name=name, argv=argv, start_seconds=0, stop_timeout=GRACE, restart=ZERO_BACKOFF
    )


def running(s: AgentStatus) -> bool:
    return s.state is AgentState.RUNNING


def stopped(s: AgentStatus) -> bool:
    return s.state is AgentState.STOPPED


class StatusWatch:
    """Every ``agents.*.status`` message, timestamped on arrival, handed to waiters."""

    def __init__(self) -> None:
        self._waiting: dict[
            str, tuple[asyncio.Future[tuple[float, AgentStatus]], Callable[[AgentStatus], bool]]
        ] = {}

    async def handle(self, msg: Msg) -> None:
        at = time.perf_counter()
        status = decode(msg.data, AgentStatus)
        entry = self._waiting.get(status.agent_id)
        if entry is not None and not entry[0].done() and entry[1](status):
            entry[0].set_result((at, status))
            del self._waiting[status.agent_id]

    def expect(
        self, agent_id: str, cond: Callable[[AgentStatus], bool]
    ) -> asyncio.Future[tuple[float, AgentStatus]]:
        fut: asyncio.Future[tuple[float, AgentStatus]] = asyncio.get_running_loop().create_future()
        self._waiting[agent_id] = (fut, cond)
        return fut


class Operator:
    """Signed commands over NATS; tokens are minted before the clock starts."""

    def __init__(self, nc: Client, issuer: TokenIssuer) -> None:
        self.nc = nc
        self.issuer = issuer
        self.node_subject = subjects.node_commands(NODE_ID)

    def _token(self, scope: str) -> str:
        return self.issuer.mint(OPERATOR, [scope])

    def place(self, spec: AgentSpec) -> bytes:
        return encode(PlaceAgent(spec=spec, token=self._token("agents:run")))

    def remove(self, name: str) -> bytes:
        return encode(RemoveAgent(agent_id=name, token=self._token("agents:stop")))

    def stop(self) -> bytes:
        return encode(StopAgent(token=self._token("agents:stop")))

    async def send(self, subject: str, payload: bytes, timeout: float = 120) -> CommandResult:  # noqa: ASYNC109
        msg = await self.nc.request(subject, payload, timeout=timeout)
        reply = decode_reply(msg.data)
        if isinstance(reply, ErrorReply):
            raise RuntimeError(f"{subject}: {reply.code.value}: {reply.message}")
        return reply

    async def remove_all(self, names: Sequence[str]) -> None:
        await asyncio.gather(*(self.send(self.node_subject, self.remove(n)) for n in names))


async def fabric_spawn(op: Operator, watch: StatusWatch, runs: int) -> list[float]:
    lat = []
    for i in range(-WARMUP, runs):
        name = f"spawn-{i + WARMUP}"
        payload = op.place(agent_spec(name, SLEEP))
        up = watch.expect(name, running)
        t0 = time.perf_counter()
        reply = asyncio.ensure_future(op.send(op.node_subject, payload))
        async with asyncio.timeout(10):
            t1, _ = await up
        await reply
        if i >= 0:
            lat.append(t1 - t0)
        await op.send(op.node_subject, op.remove(name))
    return lat


async def fabric_crash(op: Operator, watch: StatusWatch, runs: int) -> list[float]:
    name = "crash"
    up = watch.expect(name, running)
    await op.send(op.node_subject, op.place(agent_spec(name, SLEEP)))
    async with asyncio.timeout(10):
        _, status = await up
    lat = []
    for i in range(-WARMUP, runs):
        await asyncio.sleep(0.05)
        old = status.pid
        assert old is not None
        up = watch.expect(name, lambda s, old=old: running(s) and s.pid not in (None, old))
        t0 = time.perf_counter()
        psutil.Process(old).kill()
        async with asyncio.timeout(10):
            t1, status = await up
        if i >= 0:
            lat.append(t1 - t0)
    await op.remove_all([name])
    return lat


async def fabric_many(
    op: Operator, watch: StatusWatch, prefix: str, n: int, argv: list[str]
) -> tuple[float, list[str]]:
    """Place ``n`` agents at once (n requests in flight): seconds until all are RUNNING."""
    names = [f"{prefix}-{i}" for i in range(n)]
    payloads = [op.place(agent_spec(name, argv)) for name in names]
    ups = [watch.expect(name, running) for name in names]
    t0 = time.perf_counter()
    replies = [asyncio.ensure_future(op.send(op.node_subject, p)) for p in payloads]
    async with asyncio.timeout(300):
        seen = await asyncio.gather(*ups)
    await asyncio.gather(*replies)
    return max(t for t, _ in seen) - t0, names


async def fabric_stop(op: Operator, watch: StatusWatch, n: int) -> tuple[float, int]:
    """Stop ``n`` TERM-ignoring agents at once: seconds until all are STOPPED, and
    how many of them had to be SIGKILLed (all of them, if they ignored TERM)."""
    _, names = await fabric_many(op, watch, "term", n, IGNORE_TERM)
    await asyncio.sleep(0.5)  # every shell has installed its trap
    payloads = [op.stop() for _ in names]
    downs = [watch.expect(name, stopped) for name in names]
    t0 = time.perf_counter()
    replies = [
        asyncio.ensure_future(op.send(subjects.agent_commands(name), p))
        for name, p in zip(names, payloads, strict=True)
    ]
    async with asyncio.timeout(60):
        seen = await asyncio.gather(*downs)
    elapsed = max(t for t, _ in seen) - t0
    results = await asyncio.gather(*replies)
    killed = sum(1 for r in results if r.status and r.status.exit_signal == "SIGKILL")
    await op.remove_all(names)
    return elapsed, killed


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()  # the process itself: user + system, not its children
    return t.user + t.system


def measure_idle(pid: int, seconds: float) -> tuple[float, int]:
    """CPU (fraction of one core) and max RSS of the process ``pid`` over ``seconds``."""
    proc = psutil.Process(pid)
    c0, w0, rss = _cpu(proc), time.perf_counter(), 0
    while (left := seconds - (time.perf_counter() - w0)) > 0:
        check_interrupt()
        time.sleep(min(1.0, left))
        rss = max(rss, proc.memory_info().rss)
    return (_cpu(proc) - c0) / (time.perf_counter() - w0), rss


def cgroup_migration_ms(samples: int = 7, gap: float = 0.06) -> float | None:
    """What joining a cgroup adds to a spawn, as the fabric spawns an agent (the child
    writes itself into the agent's ``cgroup.procs`` before exec): median Popen time with
    that join minus median Popen time with a no-op ``preexec_fn``, spawns ``gap`` s
    apart. None without a writable cgroup v2.

    The join is a cgroup migration. On a default cgroup2 mount an isolated one waits
    for an RCU grace period (10-15 ms on this kernel); with ``favordynmods`` (or once
    it has been enabled since boot: it cannot be turned off again) it costs ~1 ms.
    It bounds the fabric's spawn and restart figures, so the bench prints it.
    """
    try:
        mount = find_cgroup2_mount(Path("/proc/self/mountinfo").read_text())
        own = own_cgroup_path(Path("/proc/self/cgroup").read_text())
        if mount is None or own is None:
            return None
        probe = mount / own.lstrip("/") / f"fabric-bench-probe-{os.getpid()}"
        probe.mkdir()
    except OSError:
        return None
    procs = bytes(probe / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    def noop() -> None:
        pass

    costs: dict[Callable[[], None], list[float]] = {join: [], noop: []}
    try:
        for _ in range(samples):
            for hook, times in costs.items():
                time.sleep(gap)
                t0 = time.perf_counter()
                child = subprocess.Popen(["/bin/true"], preexec_fn=hook)  # returns after exec
                times.append(time.perf_counter() - t0)
                child.wait()
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        time.sleep(0.05)
        with contextlib.suppress(OSError):
            probe.rmdir()
    return max(0.0, pct(costs[join], 50) - pct(costs[noop], 50)) * 1e3


def _cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of a process (where the fabric put the agent)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return None


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class FabricNode:
    """nats-server + ``fabric-node`` subprocess + an operator client, for one run."""

    def __init__(self) -> None:
        self._stack: contextlib.AsyncExitStack | None = None
        self.node: subprocess.Popen[bytes] | None = None
        self.nc: Client | None = None
        self.log: Path | None = None
        self.watch = StatusWatch()
        self.op: Operator
        self.server_pid: int | None = None

    async def __aenter__(self) -> FabricNode:
        async with contextlib.AsyncExitStack() as es:
            stack = await es.enter_async_context(
                fabric_stack({NODE_ID: "node", OPERATOR: "operator"})
            )
            es.push_async_callback(self._close)  # runs before the server stops
            ident = stack.identities[OPERATOR]
            self.nc = nc = await connect(
                stack.server.url, ca=stack.ca, cert=ident.cert, key=ident.key, name=OPERATOR
            )
            await nc.subscribe("agents.*.status", cb=self.watch.handle)
            beat = asyncio.get_running_loop().create_future()

            async def on_beat(_msg: Msg) -> None:
                if not beat.done():
                    beat.set_result(None)

            hb = await nc.subscribe(subjects.node_heartbeat(NODE_ID), cb=on_beat)
            await nc.flush()
            self.log = stack.dir / "fabric-node.log"
            cmd = [
                sys.executable,
                "-m",
                "node_agent.main",
                "--node-id",
                NODE_ID,
                "--state-dir",
                str(stack.dir / "node"),
                "--nats-url",
                stack.server.url,
                "--ca",
                str(stack.ca),
                "--cert",
                str(stack.identities[NODE_ID].cert),
                "--key",
                str(stack.identities[NODE_ID].key),
                "--token-key",
                str(stack.signing_pub),
                "--metrics-interval",
                f"{METRICS_INTERVAL:g}",
            ]
            with self.log.open("ab") as out:
                self.node = subprocess.Popen(  # noqa: ASYNC220 - one fork/exec
                    cmd,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C reaches the bench, which stops it in order
                )
            try:
                async with asyncio.timeout(30):
                    await beat
            except TimeoutError:
                msg = f"fabric-node never sent a heartbeat:\n{_tail(self.log)}"
                raise RuntimeError(msg) from None
            await hb.unsubscribe()
            self.op = Operator(nc, TokenIssuer.from_file(stack.signing_key, issuer="bench"))
            self.server_pid = stack.server.pid
            self._stack = es.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            await self._stack.aclose()

    @property
    def pid(self) -> int:
        assert self.node is not None
        return self.node.pid

    async def shutdown(self) -> tuple[float, int | None]:
        """SIGTERM (drain every agent); seconds until the node exited, and its exit code."""
        assert self.node is not None
        t0 = time.perf_counter()
        code = await asyncio.to_thread(stop_process, self.node, 120)
        return time.perf_counter() - t0, code

    async def _close(self) -> None:
        # Node first (it drains its agents), then the client; the server goes last.
        if self.node is not None:
            await asyncio.to_thread(stop_process, self.node, 60)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


async def run(plan: Plan, fab: Side, sv: Side) -> None:
    """Each figure on the fabric, then at once on supervisord (one supervisord per figure),
    so both see the same background load as nearly as possible."""
    exe, sv.extra["version"] = ensure_supervisord()
    try:
        await _run(exe, plan, fab, sv)
    except BaseException:
        INTERRUPT.set()  # let a supervisord figure running in its thread give up
        raise


async def _run(exe: Path, plan: Plan, fab: Side, sv: Side) -> None:
    small, big = plan.many
    async with FabricNode() as fn:
        op, watch = fn.op, fn.watch
        fab.extra["node_pid"] = fn.pid

        log(f"single spawn x{plan.spawn_runs}")
        fab.spawn = await fabric_spawn(op, watch, plan.spawn_runs)
        sv.spawn, sv.extra["spawn_stops_sigkilled"] = await asyncio.to_thread(
            sv_spawn, exe, plan.spawn_runs
        )

        log(f"kill -9 x{plan.crash_runs}")
        fab.crash = await fabric_crash(op, watch, plan.crash_runs)
        sv.crash = await asyncio.to_thread(sv_crash, exe, plan.crash_runs)

        log(f"{small} agents")
        fab.many[small], names = await fabric_many(op, watch, "many", small, SLEEP)
        await op.remove_all(names)
        sv.many[small], sv.many_note[small] = await asyncio.to_thread(sv_many, exe, small)

        log(f"stop {plan.stop_agents} TERM-ignoring agents")
        fab.stop, fab.stop_killed = await fabric_stop(op, watch, plan.stop_agents)
        sv.stop, sv.stop_killed = await asyncio.to_thread(sv_stop, exe, plan.stop_agents)

        log(f"fabric: {big} agents, then idle {plan.idle_seconds:g} s")
        fab.many[big], names = await fabric_many(op, watch, "idle", big, SLEEP)
        await asyncio.sleep(2)
        proc = psutil.Process(fn.pid)
        children = proc.children()
        fab.idle_agents = len(children)
        fab.extra["agent_cgroup"] = _cgroup_of(children[0].pid) if children else None
        server = psutil.Process(fn.server_pid) if fn.server_pid else None
        s0 = _cpu(server) if server else 0.0
        w0 = time.perf_counter()
        fab.cpu, fab.rss = await asyncio.to_thread(measure_idle, fn.pid, plan.idle_seconds)
        if server is not None:  # not the node's cost, but what its reports cost the server
            share = (_cpu(server) - s0) / (time.perf_counter() - w0)
            fab.extra["nats_server_cpu_percent"] = round(share * 100, 2)
        fab.extra["threads"] = proc.num_threads()
        drain, fab.extra["node_exit_code"] = await fn.shutdown()
        fab.extra["drain_s"] = round(drain, 3)

    log(f"supervisord: {big} programs, then idle {plan.idle_seconds:g} s")
    await asyncio.to_thread(sv_idle, exe, plan, sv)


# --- supervisord ---------------------------------------------------------------


def ensure_supervisord() -> tuple[Path, str]:
    """supervisord from the bench's own venv, created and filled on first use."""
    exe = VENV / "bin" / "supervisord"
    if not exe.exists():
        log(f"creating {VENV} and installing supervisor (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "supervisor"],
            check=True,
        )
    version = subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return exe, version


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over a unix socket, one kept-alive connection (as supervisorctl does)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection[1] is None:
            self._connection = (host, _UnixConnection(self._path))
        return self._connection[1]


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    numprocs: int = 1

    def render(self) -> str:
        lines = [
            f"[program:{self.name}]",
            f"command={shlex.join(self.argv)}",
            "autostart=false",
            "autorestart=true",
            "startsecs=0",
            f"stopwaitsecs={GRACE:g}",
            "stopasgroup=true",
            "killasgroup=true",
        ]
        if self.numprocs > 1:
            lines += [f"numprocs={self.numprocs}", "process_name=%(program_name)s-%(process_num)d"]
        return "\n".join(lines) + "\n"


class Supervisord:
    """One supervisord (``-n``) with a generated config, in its own temp dir."""

    def __init__(self, exe: Path, programs: Sequence[Program]) -> None:
        self.exe = exe
        self.programs = programs
        # supervisord raises RLIMIT_NOFILE to minfds, and each child closes every fd
        # below it one by one before exec: keep the default (1024) unless the fds of
        # these programs (3 pipes + 2 log files each) would not fit under our limit.
        needed = 5 * sum(p.numprocs for p in programs) + 64
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.minfds = 1024 if soft >= needed else max(1024, needed)
        self.dir = Path(tempfile.mkdtemp(prefix="supervisord-bench-"))
        self.sock = self.dir / "supervisor.sock"
        self.log = self.dir / "supervisord.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rpc: Any = None

    def config(self) -> str:
        (self.dir / "logs").mkdir(exist_ok=True)
        head = f"""\
[unix_http_server]
file={self.sock}

[supervisord]
logfile={self.log}
pidfile={self.dir / "supervisord.pid"}
childlogdir={self.dir / "logs"}
nodaemon=true
minfds={self.minfds}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

"""
        return head + "\n".join(p.render() for p in self.programs)

    def __enter__(self) -> Supervisord:
        conf = self.dir / "supervisord.conf"
        conf.write_text(self.config())
        with (self.dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.exe), "-n", "-c", str(conf)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_UnixTransport(str(self.sock))
        )
        self.rpc = proxy.supervisor
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited:\n{_tail(self.dir / 'stdout.log')}")
            with contextlib.suppress(OSError, xmlrpc.client.Fault):
                if self.rpc.getState()["statename"] == "RUNNING":
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord not ready:\n{_tail(self.log)}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None:
                stop_process(self.proc, 60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def sigkills(self) -> int:
        return self.log.read_text(errors="replace").count("with SIGKILL")


def poll(
    call: Callable[[], Any], done: Callable[[Any], bool], interval: float, timeout: float
) -> tuple[float, Any]:
    """Call until ``done(result)``; the perf_counter time of the answer that said so."""
    deadline = time.perf_counter() + timeout
    while True:
        check_interrupt()
        result = call()
        now = time.perf_counter()
        if done(result):
            return now, result
        if now > deadline:
            raise TimeoutError(result)
        time.sleep(interval)


def all_in(state: str, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda infos: sum(1 for i in infos if i["statename"] == state) >= n


def sv_spawn(exe: Path, runs: int) -> tuple[list[float], int]:
    lat = []
    with Supervisord(exe, [Program("spawn", SLEEP)]) as sv:
        for i in range(-WARMUP, runs):
            t0 = time.perf_counter()
            sv.rpc.startProcess("spawn", False)
            t1, info = poll(
                lambda: sv.rpc.getProcessInfo("spawn"),
                lambda info: info["statename"] == "RUNNING",
                0.001,
                10,
            )
            if i >= 0:
                lat.append(t1 - t0)
            wait_exec(info["pid"], SLEEP)
            sv.rpc.stopProcess("spawn", True)
        killed = sv.sigkills()
    return lat, killed


def wait_exec(pid: int, argv: list[str]) -> None:
    """Wait until ``pid`` runs ``argv``.

    With startsecs=0 supervisord reports RUNNING right after fork, while the child
    is still a copy of supervisord (closing fds below minfds); a SIGTERM then lands
    in supervisord's own handler and is lost, and the stop ends in SIGKILL after
    stopwaitsecs. Not part of any timing.
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).cmdline() == argv:
                return
        time.sleep(0.0005)


def sv_crash(exe: Path, runs: int) -> list[float]:
    lat = []
    with Supervisord(exe, [Program("crash", SLEEP)]) as sv:
        sv.rpc.startProcess("crash", True)
        for i in range(-WARMUP, runs):
            time.sleep(0.05)
            old = sv.rpc.getProcessInfo("crash")["pid"]
            t0 = time.perf_counter()
            psutil.Process(old).kill()
            t1, _ = poll(
                lambda: sv.rpc.getProcessInfo("crash"),
                lambda info, old=old: (
                    info["statename"] == "RUNNING" and info["pid"] not in (0, old)
                ),
                0.001,
                10,
            )
            if i >= 0:
                lat.append(t1 - t0)
    return lat


def _start_group(sv: Supervisord, group: str, n: int, timeout: float) -> tuple[float | None, str]:
    """startProcessGroup, then poll until all ``n`` are RUNNING: seconds (None on timeout)."""
    interval = 0.005 if n <= 100 else 0.02
    t0 = time.perf_counter()
    sv.rpc.startProcessGroup(group, False)
    try:
        t1, _ = poll(sv.rpc.getAllProcessInfo, all_in("RUNNING", n), interval, timeout)
    except TimeoutError as exc:
        up = sum(1 for i in exc.args[0] if i["statename"] == "RUNNING")
        return None, f"only {up}/{n} RUNNING after {timeout:g} s"
    return t1 - t0, ""


def sv_many(exe: Path, n: int) -> tuple[float | None, str]:
    with Supervisord(exe, [Program("many", SLEEP, n)]) as sv:
        return _start_group(sv, "many", n, 60)


def sv_stop(exe: Path, n: int) -> tuple[float, int]:
    with Supervisord(exe, [Program("term", IGNORE_TERM, n)]) as sv:
        _start_group(sv, "term", n, 60)
        time.sleep(0.5)  # every shell has installed its trap
        before = sv.sigkills()
        t0 = time.perf_counter()
        sv.rpc.stopProcessGroup("term", False)
        t1, _ = poll(sv.rpc.getAllProcessInfo, all_in("STOPPED", n), 0.01, 60)
        return t1 - t0, sv.sigkills() - before


def sv_idle(exe: Path, plan: Plan, side: Side) -> None:
    big = plan.many[1]
    with Supervisord(exe, [Program("idle", SLEEP, big)]) as sv:
        side.many[big], side.many_note[big] = _start_group(sv, "idle", big, 300)
        time.sleep(2)
        assert sv.proc is not None
        proc = psutil.Process(sv.proc.pid)
        side.idle_agents = len(proc.children())
        side.cpu, side.rss = measure_idle(sv.proc.pid, plan.idle_seconds)
        side.extra["fds"] = proc.num_fds()


# --- report --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    figure: str
    unit: str  # "ms", "s", "%", "MB"
    fabric: float | None
    supervisord: float | None
    target: float | None = None
    note: str = ""

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if self.unit == "ms":
            return f"{value * 1e3:.2f} ms"
        if self.unit == "s":
            return f"{value:.3f} s"
        if self.unit == "%":
            return f"{value * 100:.2f} %"
        return f"{value / 1e6:.1f} MB"

    def verdict(self) -> str:
        parts = []
        if self.target is not None and self.fabric is not None:
            parts.append("PASS" if self.fabric <= self.target else "MISS")
        if self.fabric is not None and self.supervisord is not None:
            ratio = self.supervisord / self.fabric if self.fabric else float("inf")
            if ratio >= 1.05:
                parts.append(f"{ratio:.1f}x better than supervisord")
            elif ratio <= 1 / 1.05:
                parts.append(f"{1 / ratio:.1f}x worse than supervisord")
            else:
                parts.append("on par with supervisord")
        return "; ".join(parts) or "-"

    def cells(self) -> list[str]:
        target = "-" if self.target is None else "<= " + self.fmt(self.target)
        sv = self.fmt(self.supervisord) + (f" ({self.note})" if self.note else "")
        return [self.figure, self.fmt(self.fabric), sv, target, self.verdict()]

    def as_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "unit": self.unit,
            "fabric": self.fabric,
            "supervisord": self.supervisord,
            "target": self.target,
            "verdict": self.verdict(),
            "note": self.note,
            "text": dict(zip(HEADERS, self.cells(), strict=True)),
        }


HEADERS = ["figure", "fabric", "supervisord", "target", "verdict"]


def _p(xs: list[float], p: float) -> float | None:
    return pct(xs, p) if xs else None


def rows(plan: Plan, fab: Side, sv: Side) -> list[Row]:
    small, big = plan.many
    return [
        Row(
            f"single spawn -> RUNNING, p50 of {plan.spawn_runs}",
            "ms",
            _p(fab.spawn, 50),
            _p(sv.spawn, 50),
            0.005,
        ),
        Row(
            f"single spawn -> RUNNING, p99 of {plan.spawn_runs}",
            "ms",
            _p(fab.spawn, 99),
            _p(sv.spawn, 99),
        ),
        Row(f"{small} agents -> all RUNNING", "s", fab.many.get(small), sv.many.get(small), 0.5),
        Row(
            f"{big:,} agents -> all RUNNING",
            "s",
            fab.many.get(big),
            sv.many.get(big),
            note=sv.many_note.get(big, ""),
        ),
        Row(
            f"kill -9 -> new pid RUNNING, p50 of {plan.crash_runs}",
            "ms",
            _p(fab.crash, 50),
            _p(sv.crash, 50),
            0.020,
        ),
        Row(
            f"kill -9 -> new pid RUNNING, max of {plan.crash_runs}",
            "ms",
            max(fab.crash, default=None),
            max(sv.crash, default=None),
            0.020,
        ),
        Row(
            f"stop {plan.stop_agents} TERM-ignoring agents, {GRACE:g} s grace",
            "s",
            fab.stop,
            sv.stop,
            2.5,
        ),
        Row(
            f"daemon CPU, {big:,} idle agents, {plan.idle_seconds:g} s (of one core)",
            "%",
            fab.cpu,
            sv.cpu,
            0.02,
        ),
        Row(f"daemon RSS (max), {big:,} idle agents", "MB", fab.rss, sv.rss, 80e6),
    ]


NOTES = [
    "fabric: RUNNING/STOPPED as seen by a NATS subscriber on agents.*.status (TLS "
    "nats-server, signed tokens, fabric-node --metrics-interval 5, default heartbeat 1 s).",
    "supervisord: RUNNING/STOPPED as its XML-RPC API reports them (unix socket); the API has "
    "no events, so getProcessInfo is polled every 1 ms (getAllProcessInfo every 5 ms for "
    "100, 20 ms for 1,000 and 10 ms while stopping).",
    "Both: start_seconds/startsecs=0, restart always with no backoff/autorestart=true, "
    "stop_timeout/stopwaitsecs=2, process group signalled (stopasgroup=true); "
    f"{WARMUP} warm-up runs not counted; CPU and RSS are the daemon's own process only "
    "(psutil cpu_times user+system delta, RSS max of 1 s samples).",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, 15 s idle window")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    def interrupted(_sig: int, _frame: object) -> None:
        INTERRUPT.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # asyncio warns about TLS teardown details of the operator client: not bench output.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    marker = Marker()
    marker.install()
    info = machine()
    info["cgroup_migration_ms"] = cgroup_migration_ms()
    fab, sv = Side(), Side()
    try:
        try:
            asyncio.run(run(plan, fab, sv))
        except KeyboardInterrupt:
            log("interrupted; what this run started is stopped")
            return 130
        finally:
            INTERRUPT.set()
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        left = marker.sweep()
        if left:
            log(f"killed {len(left)} leftover process(es): {left}")
    table = rows(plan, fab, sv)
    checks = {
        "fabric_agents_idle": fab.idle_agents,
        "supervisord_programs_idle": sv.idle_agents,
        "fabric_stops_needing_sigkill": fab.stop_killed,
        "supervisord_stops_needing_sigkill": sv.stop_killed,
        "supervisord_spawn_stops_sigkilled": sv.extra.get("spawn_stops_sigkilled"),
        "leftover_processes_killed": len(left),
    }
    if args.json:
        out = {
            "machine": info,
            "quick": args.quick,
            "supervisord_version": sv.extra.get("version"),
            "rows": [r.as_json() for r in table],
            "checks": checks,
            "fabric_extra": fab.extra,
            "supervisord_extra": sv.extra,
            "raw": {
                "fabric": {"spawn": fab.spawn, "crash": fab.crash},
                "supervisord": {"spawn": sv.spawn, "crash": sv.crash},
            },
            "notes": NOTES,
        }
        print(json.dumps(out, indent=2))
        return 0
    ms = info["cgroup_migration_ms"]
    migration = "n/a (no writable cgroup v2)" if ms is None else f"{ms:.1f} ms"
    print(
        f"node agent bench{' (--quick)' if args.quick else ''}: {info['date']}, "
        f"nproc {info['nproc']}, Python {info['python']}, kernel {info['kernel']}, "
        f"supervisord {sv.extra.get('version')}, 1-min load avg {info['loadavg'][0]} at start, "
        f"{info['loadavg_at_end'][0]} at end; joining a cgroup adds {migration} to a spawn"
    )
    print()
    print(render_table(HEADERS, [r.cells() for r in table]))
    print()
    for note in NOTES:
        print(f"- {note}")
    print(f"- checks: {', '.join(f'{k}={v}' for k, v in checks.items())}")
    print(
        f"- fabric agents' cgroup: {fab.extra.get('agent_cgroup')}; nats-server CPU in the "
        f"idle window: {fab.extra.get('nats_server_cpu_percent')} % of one core"
    )
    drain = fab.extra.get("drain_s")
    print(f"- fabric: drain of {plan.many[1]:,} agents on SIGTERM: {drain} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
