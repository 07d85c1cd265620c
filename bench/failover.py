"""Failover figures for the controller (a benchmark, not a test).

    python bench/failover.py                 # everything, default sizes
    python bench/failover.py --only node     # node loss only (also: leader, scale)

Three measurements, each on its own TLS nats-server in a temporary directory
(PKI made fresh, everything removed at the end; every process started here
is stopped by its pid):

node loss
    One ``fabric controller run`` and three real ``fabric-node`` processes,
    default settings (heartbeat 0.5 s, node_timeout 1.5 s, start_seconds 1 s).
    A one-replica deployment runs ``sleep``; each run SIGKILLs the node agent
    hosting it together with its children and times the kill to the first
    ``AgentStatus`` saying RUNNING from another node (also: to STARTING, i.e.
    the replacement spawned). The killed node is started again (fresh state
    directory) and waited for before the next run.
leader loss
    Two ``fabric controller run`` processes, default lease (TTL 3 s, renewed
    every 1 s). Each run SIGKILLs the lease holder and times the kill to the
    ``events.controller.leader`` event of the other; the killed one comes back
    as the standby.
scale
    One ``fabric controller run`` (heartbeat interval 1 s, node_timeout 3 s),
    1,000 simulated nodes heartbeating at 1 Hz from this process (a few
    connections with the controller certificate, which may publish for any
    node id; they register, answer place commands and report what they were
    given), 1,000 deployments x 10 replicas = 10,000 agents placed on them.
    Then: the controller's CPU (user + system, from /proc) over a quiet
    window, and ``fabric.discover`` latency from a viewer (sequential).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from fabric.connect import connect  # noqa: E402
from fabric.controller.lease import LEASE_KEY, LeaseValue  # noqa: E402
from fabric.controller.streams import LEASE_BUCKET  # noqa: E402
from fabric.nats_server import NatsServer  # noqa: E402
from fabric.pki import Identity, init_pki, issue_identity  # noqa: E402
from fabric.tokens import TokenIssuer  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.agent import AgentState, AgentStatus  # noqa: E402
from schemas.api import ApiResult  # noqa: E402
from schemas.codec import decode, decode_node_command, encode  # noqa: E402
from schemas.command import CommandResult, PlaceAgent, RemoveAgent  # noqa: E402
from schemas.discovery import DiscoverReply, DiscoverRequest  # noqa: E402
from schemas.errors import ErrorReply  # noqa: E402
from schemas.node import (  # noqa: E402
    AgentSummary,
    NodeHeartbeat,
    NodeInfo,
    NodeResources,
    RegisterReply,
    RegisterRequest,
)

IDENTITIES = {
    "ctl-1": "controller",
    "n1": "node",
    "n2": "node",
    "n3": "node",
    "op-1": "operator",
    "view-1": "viewer",
}


# --- figures -------------------------------------------------------------------


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0-100)."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def summary(xs: Sequence[float], unit: str = "s", scale: float = 1.0) -> str:
    if not xs:
        return "no samples"
    values = [x * scale for x in xs]
    return (
        f"p50 {pct(values, 50):.2f} {unit}, p99 {pct(values, 99):.2f} {unit}, "
        f"max {max(values):.2f} {unit} (n={len(values)})"
    )


# --- processes -------------------------------------------------------------------


@dataclass
class Stack:
    """A PKI and one nats-server in a temporary directory; processes started on it."""

    dir: Path
    pki_dir: Path
    identities: dict[str, Identity]
    server: NatsServer
    marker: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.pki_dir / "ca.crt"

    async def client(self, name: str, **options: Any) -> Client:
        ident = self.identities[name]
        nc = await connect(
            self.server.url, ca=self.ca, cert=ident.cert, key=ident.key, name=name, **options
        )
        self.clients.append(nc)
        return nc

    def issuer(self) -> TokenIssuer:
        return TokenIssuer.from_file(self.pki_dir / "signing.key", "bench")

    def _start(
        self, argv: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.dir / log).open("ab") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=out, env={**os.environ, **(env or {})}
            )
        self.procs.append(proc)
        return proc

    def controller(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        ident = self.identities["ctl-1"]
        argv = [
            sys.executable, "-m", "fabric", "controller", "run",
            "--name", name,
            "--url", self.server.url,
            "--ca", str(self.ca),
            "--cert", str(ident.cert),
            "--key", str(ident.key),
            "--pki", str(self.pki_dir),
            *extra,
        ]  # fmt: skip
        return self._start(argv, f"{name}.log")

    def node(self, node_id: str, state_dir: Path) -> subprocess.Popen[bytes]:
        ident = self.identities[node_id]
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(state_dir),
            "--nats-url", self.server.url,
            "--ca", str(self.ca),
            "--cert", str(ident.cert),
            "--key", str(ident.key),
            "--token-key", str(self.pki_dir / "signing.pub"),
        ]  # fmt: skip
        return self._start(argv, f"{node_id}.log")

    def sleeper(self) -> list[str]:
        """An agent's argv, carrying this run's marker so leftovers can be found."""
        return [sys.executable, "-c", "import time; time.sleep(3600)", self.marker]

    async def stop_all(self) -> None:
        for nc in self.clients:
            with contextlib.suppress(Exception):
                await nc.close()
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(p.poll() is not None for p in live), within=15, step=0.05)
        for proc in live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # Agents the node agents started and could not stop (their node was killed).
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if self.marker in (proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


@contextlib.asynccontextmanager
async def stack(base: Path, name: str) -> AsyncIterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix=f"failover-{name}-", dir=base))
    pki_dir = root / "pki"
    init_pki(pki_dir)
    identities = {n: issue_identity(pki_dir, role, n) for n, role in IDENTITIES.items()}
    server = NatsServer.local(pki_dir, root / "nats")
    await server.start()
    st = Stack(root, pki_dir, identities, server, f"failover-{uuid.uuid4().hex[:12]}")
    try:
        yield st
    finally:
        try:
            await st.stop_all()
        finally:
            await server.stop(grace=5)
            shutil.rmtree(root, ignore_errors=True)


async def until(
    check: Callable[[], bool | Awaitable[bool]], within: float, step: float = 0.02
) -> None:
    async with asyncio.timeout(within):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(step)


async def api(
    op: Client, issuer: TokenIssuer, method: str, body: dict[str, Any], scope: str
) -> ApiResult:
    for _ in range(20):
        payload = {**body, "token": issuer.mint("bench", [scope])}
        try:
            msg = await op.request(subjects.api(method), json.dumps(payload).encode(), timeout=5)
        except TimeoutError:
            continue
        reply = decode(msg.data, ApiResult | ErrorReply)  # type: ignore[arg-type]
        if isinstance(reply, ApiResult):
            return reply
        raise RuntimeError(f"{method}: {reply.code.value}: {reply.message}")
    raise RuntimeError(f"{method}: no answer")


async def ready_nodes(viewer: Client) -> set[str]:
    msg = await viewer.request(
        subjects.DISCOVER, encode(DiscoverRequest(what="nodes", state="ready")), timeout=5
    )
    return {n.info.node_id for n in decode(msg.data, DiscoverReply).nodes}


# --- node loss -------------------------------------------------------------------


async def node_loss(base: Path, runs: int) -> dict[str, list[float]]:
    async with stack(base, "node") as st:
        st.controller("bench-ctl")
        nodes = ("n1", "n2", "n3")
        procs = {n: st.node(n, st.dir / f"{n}-0") for n in nodes}
        op = await st.client("op-1")
        viewer = await st.client("view-1")
        statuses: list[tuple[float, AgentStatus]] = []

        async def on_status(msg: Msg) -> None:
            statuses.append((time.monotonic(), decode(msg.data, AgentStatus)))

        await viewer.subscribe(subjects.agent_status("victim"), cb=on_status)
        await until(lambda: _has_nodes(viewer, set(nodes)), within=60, step=0.1)
        issuer = st.issuer()
        spec = {"name": "victim", "argv": st.sleeper()}
        await api(op, issuer, "create", {"deployment": {"spec": spec}}, "agents:run")
        await until(lambda: any(s.state is AgentState.RUNNING for _, s in statuses), within=30)

        running: list[float] = []
        started: list[float] = []
        for run in range(runs):
            got = await api(op, issuer, "get", {"name": "victim"}, "read")
            host = got.deployments[0].replicas[0].node_id
            assert host is not None
            agent = psutil.Process(procs[host].pid)
            victims = [agent, *agent.children(recursive=True)]
            seen = len(statuses)
            for proc in victims:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            killed = time.monotonic()
            procs[host].wait()

            def after(
                state: AgentState, host: str = host, seen: int = seen, killed: float = killed
            ) -> float | None:
                for at, s in statuses[seen:]:
                    if s.node_id != host and s.state is state:
                        return at - killed
                return None

            await until(lambda: after(AgentState.RUNNING) is not None, within=30)
            running.append(after(AgentState.RUNNING) or 0.0)
            started.append(after(AgentState.STARTING) or running[-1])
            print(
                f"  node loss run {run + 1}: {host} killed,"
                f" RUNNING elsewhere after {running[-1]:.2f} s"
            )
            procs[host] = st.node(host, st.dir / f"{host}-{run + 1}")
            await until(lambda: _has_nodes(viewer, set(nodes)), within=60, step=0.1)
        return {"running": running, "starting": started}


async def _has_nodes(viewer: Client, wanted: set[str]) -> bool:
    try:
        return wanted <= await ready_nodes(viewer)
    except Exception:
        return False


# --- leader loss ---------------------------------------------------------------


async def leader_loss(base: Path, runs: int) -> list[float]:
    async with stack(base, "leader") as st:
        names = ("bench-a", "bench-b")
        procs = {n: st.controller(n) for n in names}
        admin = await st.client("ctl-1")
        viewer = await st.client("view-1")
        leaders: list[tuple[float, str]] = []

        async def on_leader(msg: Msg) -> None:
            leaders.append((time.monotonic(), json.loads(msg.data)["data"]["leader"]))

        await viewer.subscribe(subjects.event("controller.leader"), cb=on_leader)
        await until(lambda: _both_up(viewer, names), within=60, step=0.2)
        kv = await admin.jetstream().key_value(LEASE_BUCKET)

        async def holder() -> str | None:
            try:
                entry = await kv.get(LEASE_KEY)
            except Exception:
                return None
            return decode(entry.value or b"{}", LeaseValue).holder if entry.value else None

        async def holder_known() -> bool:
            return await holder() in names

        took: list[float] = []
        for run in range(runs):
            await until(holder_known, within=30, step=0.1)
            leader = await holder()
            assert leader is not None
            other = next(n for n in names if n != leader)
            seen = len(leaders)
            procs[leader].kill()
            killed = time.monotonic()
            procs[leader].wait()

            def new_leader(
                other: str = other, seen: int = seen, killed: float = killed
            ) -> float | None:
                for at, name in leaders[seen:]:
                    if name == other:
                        return at - killed
                return None

            await until(lambda: new_leader() is not None, within=30)
            took.append(new_leader() or 0.0)
            print(
                f"  leader loss run {run + 1}: {leader} killed -> {other} leads in {took[-1]:.2f} s"
            )
            procs[leader] = st.controller(leader)
            await until(lambda: _both_up(viewer, names), within=60, step=0.2)
        return took


async def _both_up(viewer: Client, names: Sequence[str]) -> bool:
    seen: set[str] = set()

    async def on_pong(msg: Msg) -> None:
        seen.add(json.loads(msg.data)["metadata"]["controller"])

    inbox = viewer.new_inbox()
    sub = await viewer.subscribe(inbox, cb=on_pong)
    try:
        await viewer.publish("$SRV.PING.fabric-controller", b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await until(lambda: set(names) <= seen, within=0.5)
    finally:
        await sub.unsubscribe()
    return set(names) <= seen


# --- scale: 1,000 simulated nodes, 10,000 agents ----------------------------------


class Simulator:
    """Many nodes on a few connections: register, answer commands, heartbeat at 1 Hz."""

    def __init__(self, conns: Sequence[Client], node_ids: Sequence[str]) -> None:
        self.conns = list(conns)
        self.node_ids = list(node_ids)
        self.agents: dict[str, dict[str, int]] = {n: {} for n in node_ids}
        self.commands = 0
        self.beats = 0

    def info(self, i: int, node_id: str) -> NodeInfo:
        return NodeInfo(
            node_id=node_id,
            hostname=f"sim-{node_id}",
            pid=1000 + i,
            version="0.1.0",
            labels={"zone": f"z{i % 10}", "rack": f"r{i % 50}"},
            capabilities=["summarize"] if i % 4 == 0 else [],
            resources=NodeResources(cpus=16, memory_bytes=64 << 30),
            started_at=datetime.now(UTC),
        )

    async def register_all(self) -> None:
        sem = asyncio.Semaphore(50)

        async def one(i: int, node_id: str) -> None:
            nc = self.conns[i % len(self.conns)]
            async with sem:
                msg = await nc.request(
                    subjects.node_register(node_id),
                    encode(RegisterRequest(node=self.info(i, node_id))),
                    timeout=10,
                )
                decode(msg.data, RegisterReply)

        await asyncio.gather(*(one(i, n) for i, n in enumerate(self.node_ids)))

    async def serve_commands(self) -> None:
        async def on_command(msg: Msg) -> None:
            node_id = msg.subject.split(".")[1]
            command = decode_node_command(msg.data)
            self.commands += 1
            if isinstance(command, PlaceAgent):
                self.agents[node_id][command.spec.name] = command.epoch
                reply: Any = CommandResult(op="place", node_id=node_id, agent_id=command.spec.name)
            elif isinstance(command, RemoveAgent):
                self.agents[node_id].pop(command.agent_id, None)
                reply = CommandResult(op="remove", node_id=node_id, agent_id=command.agent_id)
            else:
                reply = ErrorReply(code="unknown_op", message="not simulated")  # type: ignore[arg-type]
            await msg.respond(encode(reply))

        for nc in self.conns:
            await nc.subscribe("nodes.*.commands", queue="sim", cb=on_command)

    async def heartbeat(self) -> None:
        """Every node once a second, spread evenly over the second."""
        seq = 0
        n = len(self.node_ids)
        start = time.monotonic()
        while True:
            seq += 1
            for i, node_id in enumerate(self.node_ids):
                beat = NodeHeartbeat(
                    node_id=node_id,
                    seq=seq,
                    sent_at=datetime.now(UTC),
                    pid=1000 + i,
                    agents=[
                        AgentSummary(a, AgentState.RUNNING, e, 50_000 + i)
                        for a, e in sorted(self.agents[node_id].items())
                    ],
                )
                nc = self.conns[i % len(self.conns)]
                await nc.publish(subjects.node_heartbeat(node_id), encode(beat))
                self.beats += 1
                due = start + (seq - 1) + (i + 1) / n
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    def placed(self) -> int:
        return sum(len(a) for a in self.agents.values())


@dataclass
class ScaleFigures:
    cpu_percent: float
    window: float
    setup_seconds: float
    discover: dict[str, list[float]]
    cpu_during_discover: float
    rss_mib: float


async def scale(
    base: Path, nodes: int, deployments: int, replicas: int, window: float
) -> ScaleFigures:
    async with stack(base, "scale") as st:
        ctl = st.controller("bench-ctl", "--heartbeat-interval", "1", "--node-timeout", "3")
        conns = [await st.client("ctl-1") for _ in range(4)]
        op = await st.client("op-1")
        viewer = await st.client("view-1")
        await until(lambda: _both_up(viewer, ["bench-ctl"]), within=60, step=0.2)
        sim = Simulator(conns, [f"s{i:04d}" for i in range(nodes)])
        await sim.serve_commands()
        for nc in conns:
            await nc.flush()
        began = time.monotonic()
        await sim.register_all()
        async with asyncio.TaskGroup() as tg:
            beating = tg.create_task(sim.heartbeat())
            try:
                issuer = st.issuer()
                sem = asyncio.Semaphore(16)

                async def create(i: int) -> None:
                    spec = {"name": f"d{i:04d}", "argv": ["sleep", "3600"]}
                    body = {"deployment": {"spec": spec, "replicas": replicas}}
                    async with sem:
                        await api(op, issuer, "create", body, "agents:run")

                await asyncio.gather(*(create(i) for i in range(deployments)))
                wanted = deployments * replicas
                last = 0.0

                def progress() -> bool:
                    nonlocal last
                    if time.monotonic() - last > 10:
                        last = time.monotonic()
                        print(f"  ... {sim.placed()} of {wanted} placed")
                    return sim.placed() >= wanted

                await until(progress, within=600, step=0.5)
                setup = time.monotonic() - began
                print(f"  {wanted} agents placed on {nodes} nodes in {setup:.1f} s; settling")
                # Settle: every node's report stored, nothing left to send.
                quiet_from = sim.commands
                await asyncio.sleep(10)  # a wait for the fleet to go quiet, not a synchronisation
                if sim.commands != quiet_from:
                    print(f"  note: {sim.commands - quiet_from} commands while settling")

                proc = psutil.Process(ctl.pid)
                cpu = await _cpu(proc, window)
                rss = proc.memory_info().rss / 2**20
                print(
                    f"  controller CPU over {window:.0f} s, heartbeats only:"
                    f" {cpu:.1f} % of one core"
                )

                queries = {
                    "agent by id": lambda i: DiscoverRequest(
                        what="agents", ids=[f"d{i % deployments:04d}-{i % replicas}"]
                    ),
                    "node by id": lambda i: DiscoverRequest(
                        what="nodes", ids=[f"s{i % nodes:04d}"]
                    ),
                    "nodes by label (1/50)": lambda i: DiscoverRequest(
                        what="nodes", labels={"rack": f"r{i % 50}"}
                    ),
                    "nodes by capability+state (1/4)": lambda i: DiscoverRequest(
                        what="nodes", capability="summarize", state="ready"
                    ),
                    f"all nodes ({nodes})": lambda i: DiscoverRequest(what="nodes"),
                }
                latencies: dict[str, list[float]] = {}
                before = _cpu_seconds(proc)
                t0 = time.monotonic()
                for label, make in queries.items():
                    samples: list[float] = []
                    count = 100 if label.startswith("all") else 1000
                    for i in range(count):
                        body = encode(make(i))
                        start = time.perf_counter()
                        msg = await viewer.request(subjects.DISCOVER, body, timeout=5)
                        samples.append(time.perf_counter() - start)
                        decode(msg.data, DiscoverReply)
                    latencies[label] = samples
                    print(f"  discover {label}: {summary(samples, 'ms', 1000)}")
                busy = 100 * (_cpu_seconds(proc) - before) / (time.monotonic() - t0)
            finally:
                beating.cancel()
        return ScaleFigures(cpu, window, setup, latencies, busy, rss)


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def _cpu(proc: psutil.Process, window: float) -> float:
    before = _cpu_seconds(proc)
    start = time.monotonic()
    await asyncio.sleep(window)  # the measurement window itself
    return 100 * (_cpu_seconds(proc) - before) / (time.monotonic() - start)


# --- main --------------------------------------------------------------------------


def machine() -> str:
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" Linux {platform.release()}, load {os.getloadavg()[0]:.2f}"
    )


async def main(args: argparse.Namespace) -> int:
    # nats-py reports every reconnect attempt through logging; the figures are the output.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    only = set(args.only.split(",")) if args.only else {"node", "leader", "scale"}
    base = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    lines = [f"machine: {machine()}"]
    try:
        if "node" in only:
            print(f"node loss: {args.runs} runs, real fabric-node processes, default settings")
            figures = await node_loss(base, args.runs)
            lines.append(
                f"node loss -> replacement RUNNING: {summary(figures['running'])} (target <= 3 s)"
            )
            lines.append(
                f"node loss -> replacement spawned (STARTING): {summary(figures['starting'])}"
            )
        if "leader" in only:
            print(
                f"leader loss: {args.leader_runs} runs, SIGKILL of the lease holder, default lease"
            )
            took = await leader_loss(base, args.leader_runs)
            lines.append(f"leader loss -> new leader: {summary(took)} (target <= 5 s)")
        if "scale" in only:
            total = args.deployments * args.replicas
            print(f"scale: {args.nodes} simulated nodes at 1 Hz, {total} agents")
            s = await scale(base, args.nodes, args.deployments, args.replicas, args.window)
            lines.append(
                f"controller CPU, {args.nodes} nodes at 1 Hz + {total} agents:"
                f" {s.cpu_percent:.1f} %"
                f" of one core over {s.window:.0f} s (target <= 50 %); RSS {s.rss_mib:.0f} MiB;"
                f" setup (register + create + place) {s.setup_seconds:.1f} s"
            )
            for label, samples in s.discover.items():
                lines.append(f"fabric.discover {label}: {summary(samples, 'ms', 1000)}")
            lines.append(
                "controller CPU while answering discover back to back:"
                f" {s.cpu_during_discover:.1f} %"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print("\n".join(lines))
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated: node, leader, scale")
    parser.add_argument("--runs", type=int, default=20, help="node-loss runs (default 20)")
    parser.add_argument("--leader-runs", type=int, default=10, help="leader-loss runs (default 10)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--window", type=float, default=30.0, help="CPU window, seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
