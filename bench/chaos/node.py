"""Long-form node-side chaos (issue 8) against real fabric-node processes (not a test).

    python bench/chaos/node.py                      # every scenario, defaults
    python bench/chaos/node.py --only flapping --seconds 120
    python bench/chaos/node.py --only disk --runs 10

Scenarios (the short forms are tests/test_chaos_node.py and
tests/test_chaos_slow_consumer.py, built on the same helpers):

flapping
    10 agents crashing 50 ms after each start, restart ``always`` for ever:
    5 with backoff 0.05 s doubling to 0.4 s, 5 with none at all.
forkbomb
    A fork bomb under ``limits.pids`` (cgroup pids.max when the node has the
    controller, else RLIMIT_NPROC as a spare system user), then stopped.
slow
    A viewer that subscribes to everything a dashboard follows and never
    reads, while two agents' logs are published (~2.5 MB/s) and a
    controller follows the node; ``--runs`` slow consumers one after another.
disk
    The node's state dir on a 3 MiB tmpfs: per run, an agent's own log
    fills it, then a filler file does (a restart and a placement while
    full), then space comes back.

While a scenario runs, a viewer measures the node's heartbeats (gap > 3x
the interval counts as late) and an operator sends a command every 200 ms
(a reply over 1 s counts as late, none in 5 s as lost). One summary table
at the end: scenario, runs, faults injected, what was lost or late.
Exit status 1 when anything was lost (late heartbeats or replies included).
Everything it starts is stopped by pid; the tmpfs is unmounted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT / "tests", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import psutil  # noqa: E402
from agents.harness import until  # noqa: E402
from chaosnode import (  # noqa: E402
    Beats,
    Events,
    NodeProc,
    Prober,
    RawSubscriber,
    command,
    issuer,
    spare_user,
    user_pids,
)
from fleetfixtures import ControllerProcs  # noqa: E402
from natsfixtures import Clients, FabricPki, make_pki  # noqa: E402
from test_chaos_node import (  # noqa: E402
    LOG_MAX,
    LOG_WRITER,
    SYSTEM_PYTHON,
    TMPFS_BYTES,
    backoff_gaps,
    bomb_cgroup,
    bomb_spec,
    fill,
    flapper,
    pids_by_cgroup,
    record,
    small_tmpfs,
)
from test_chaos_slow_consumer import CHATTY, CHATTY_AGENTS, VIEWER_SUBJECTS, cut_line  # noqa: E402

from fabric.nats_server import NatsServer  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.agent import AgentSpec, Backoff, LogSpec  # noqa: E402
from schemas.command import (  # noqa: E402
    ListAgents,
    PlaceAgent,
    RemoveAgent,
    RestartAgent,
    StatusAgent,
    StopAgent,
)
from schemas.errors import ErrorReply  # noqa: E402

HEARTBEAT = 0.3
LATE_REPLY = 1.0


@dataclass
class Row:
    scenario: str
    runs: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # anything here fails the run
    figures: list[str] = field(default_factory=list)
    beats: int = 0
    max_gap: float = 0.0
    commands: int = 0
    worst: float = 0.0

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.lost.append(what)


class Watch:
    """Heartbeats and command replies of one node, measured from outside."""

    def __init__(self, clients: Clients, pki: FabricPki, interval: float) -> None:
        self.clients = clients
        self.iss = issuer(pki)
        self.interval = interval
        self.beats = Beats()
        self.events = Events()
        self.probe: Prober | None = None

    async def start(self) -> Any:
        viewer = await self.clients("view-1")
        op = await self.clients("op-1")
        await self.beats.start(viewer, "n1")
        await self.events.start(viewer)
        self.op = op
        return op

    def tok(self, *scopes: str) -> str:
        return self.iss.mint("op-1", list(scopes))

    def probing(self) -> None:
        self.mark = self.beats.mark()
        self.probe = Prober(
            self.op,
            subjects.node_commands("n1"),
            lambda: ListAgents(token=self.tok("read")),
        )
        self.probe.start()

    async def stop_probing(self) -> None:
        if self.probe is not None:
            await self.probe.stop()

    def judge(self, row: Row, interval: float | None = None) -> None:
        interval = interval or self.interval
        times = self.beats.at[max(0, self.mark - 1) :]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        late = sum(1 for g in gaps if g > 3 * interval)
        probe = self.probe
        assert probe is not None
        slow = sum(1 for x in probe.latencies if x > LATE_REPLY)
        row.beats += len(gaps)
        row.max_gap = max([row.max_gap, *gaps])
        row.commands += len(probe.latencies)
        row.worst = max(row.worst, probe.worst)
        row.check(late == 0, f"{late} late heartbeats (> {3 * interval:.1f}s)")
        row.check(slow == 0, f"{slow} command replies over {LATE_REPLY:g}s")
        row.check(not probe.failures, f"{len(probe.failures)} commands unanswered")

    async def place(self, spec: AgentSpec) -> Any:
        placed = await command(
            self.op,
            subjects.node_commands("n1"),
            PlaceAgent(spec=spec, token=self.tok("agents:run")),
        )
        if isinstance(placed, ErrorReply):
            raise RuntimeError(f"place {spec.name}: {placed}")
        return placed.status

    async def agent(self, agent_id: str, message: Any) -> Any:
        return await command(self.op, subjects.agent_commands(agent_id), message)


@contextlib.asynccontextmanager
async def node_and_watch(
    pki: FabricPki, server: NatsServer, base: Path, state: Path, *, clients: Clients
) -> Any:
    node = NodeProc(pki, server.url, state, base / "node.log", heartbeat=HEARTBEAT)
    watch = Watch(clients, pki, HEARTBEAT)
    try:
        await watch.start()
        await until(lambda: len(watch.beats.at) >= 2, within=15)
        yield node, watch
    finally:
        await watch.stop_probing()
        code = await node.stop()
        if code != 0:
            print(node.log()[-3000:], file=sys.stderr)
            raise RuntimeError(
                f"fabric-node exited {code} (SIGKILLed when -9: no exit 20 s after SIGTERM)"
            )


async def flapping(pki: FabricPki, server: NatsServer, base: Path, args: Any) -> Row:
    row = Row("flapping agents (crash every 50 ms)")
    clients = Clients(pki, server.url)
    try:
        for run in range(args.runs):
            run_dir = base / f"flap-{run}"
            run_dir.mkdir()
            async with node_and_watch(pki, server, run_dir, run_dir / "state", clients=clients) as (
                node,
                w,
            ):
                slow = Backoff(initial=0.05, max=0.4, multiplier=2.0, jitter=0.0)
                names = [f"flap-{i}" for i in range(5)] + [f"fast-{i}" for i in range(5)]
                for name in names:
                    backoff = slow if name.startswith("flap") else Backoff(0, 0, 1, 0)
                    await w.place(flapper(name, backoff))
                proc = psutil.Process(node.pid)
                cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
                w.probing()
                await asyncio.sleep(args.seconds)  # the scenario's duration
                await w.stop_probing()
                cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
                w.judge(row)
                exits = sum(len(w.events.of("agent.exited", n)) for n in names)
                row.figures.append(
                    f"run {run}: {exits / args.seconds:.0f} crashes/s, node agent "
                    f"{cpu * 100:.0f} % of a core, load {os.getloadavg()[0]:.1f}"
                )
                early = 0
                for name in names[:5]:
                    gaps = backoff_gaps(w.events, name)
                    expected = [min(0.4, 0.05 * 2**k) for k in range(len(gaps))]
                    row.check(
                        [round(d, 6) for d, _ in gaps] == [round(e, 6) for e in expected],
                        f"{name}: backoff sequence broken",
                    )
                    early += sum(1 for d, g in gaps if g < d - 0.005)
                row.check(early == 0, f"{early} restarts sooner than their backoff")
                row.faults["crashes"] += exits
                for name in names:
                    await w.agent(name, StopAgent(token=w.tok("agents:stop")))
            row.runs += 1
    finally:
        await clients.aclose()
    return row


async def forkbomb(pki: FabricPki, server: NatsServer, base: Path, args: Any) -> Row:
    row = Row("fork bomb under a pids limit")
    by_cgroup = pids_by_cgroup()
    user = None if by_cgroup else spare_user()
    if not by_cgroup and (user is None or not os.path.exists(SYSTEM_PYTHON)):  # noqa: ASYNC240
        row.figures.append("skipped: no cgroup pids controller and no spare user")
        return row
    clients = Clients(pki, server.url)
    try:
        for run in range(args.runs):
            run_dir = base / f"bomb-{run}"
            run_dir.mkdir()
            async with node_and_watch(pki, server, run_dir, run_dir / "state", clients=clients) as (
                _node,
                w,
            ):
                placed = await w.place(bomb_spec("bomb", user))
                members = bomb_cgroup(placed.pid) if by_cgroup else None

                def count(members: Path | None = members) -> int:
                    if members is not None:
                        with contextlib.suppress(OSError):
                            return len(members.read_text().split())
                        return 0
                    return len(user_pids(user)) if user else 0

                w.probing()
                most = 0
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    most = max(most, count())
                    await asyncio.sleep(0.05)  # sampling period
                await w.stop_probing()
                w.judge(row)
                limit = placed.limits.get("pids")
                row.figures.append(f"run {run}: pids by {limit}, at most {most} of 24")
                row.check(2 <= most <= 24, f"bomb reached {most} processes")
                stopped = await w.agent("bomb", StopAgent(token=w.tok("agents:stop")))
                row.check(stopped.status.state.value == "stopped", "bomb not stopped")
                with contextlib.suppress(TimeoutError):
                    await until(lambda: count() == 0, within=5)
                row.check(count() == 0, f"{count()} bomb processes left after the stop")
                row.faults["fork bombs"] += 1
            row.runs += 1
    finally:
        await clients.aclose()
    return row


async def slow(pki: FabricPki, server: NatsServer, base: Path, args: Any) -> Row:
    row = Row("slow consumer (dashboard never reads)")
    clients = Clients(pki, server.url)
    controllers = ControllerProcs(pki, base)
    controllers.start("ctl-chaos", [server.url])
    try:
        async with node_and_watch(pki, server, base, base / "slow-state", clients=clients) as (
            node,
            w,
        ):
            await until(lambda: "registered with a controller" in node.log(), within=20)
            for name in CHATTY_AGENTS:
                await w.place(
                    AgentSpec(
                        name=name,
                        argv=[sys.executable, "-c", CHATTY],
                        start_seconds=0,
                        logs=LogSpec(publish=True, max_bytes=4 << 20, backups=1),
                    )
                )
            w.probing()
            url = urlparse(server.url)
            ident = pki["view-1"]
            cut_times = []
            for _ in range(args.runs):
                seen = server.log_text().count("Slow Consumer Detected")
                raw = RawSubscriber(
                    url.hostname or "", url.port or 0, pki.ca, ident.cert, ident.key
                )
                raw.subscribe(VIEWER_SUBJECTS)
                started = time.monotonic()
                try:
                    await until(
                        lambda s=seen: server.log_text().count("Slow Consumer Detected") > s,
                        within=40,
                        step=0.1,
                    )
                    cut_times.append(time.monotonic() - started)
                    try:  # reading drains what was queued for it, then meets the EOF
                        await until(raw.cut_by_server, within=5, step=0.05)
                    except TimeoutError:
                        row.lost.append("the server did not close a slow consumer")
                except TimeoutError:
                    row.lost.append("a slow consumer was not cut within 40 s")
                finally:
                    raw.close()
                row.runs += 1
            await w.stop_probing()
            w.judge(row, interval=0.5)  # the controller's heartbeat interval, adopted
            row.check(not w.events.of("node.lost", "n1"), "the controller lost the node")
            row.faults["slow consumers"] += args.runs
            if cut_times:
                row.figures.append(
                    f"cut after {min(cut_times):.1f}-{max(cut_times):.1f}s "
                    "(nats-server write_deadline 10 s)"
                )
            assert cut_line(server) is not None
    finally:
        await controllers.stop_all()
        await clients.aclose()
    return row


async def disk(pki: FabricPki, server: NatsServer, base: Path, args: Any) -> Row:
    row = Row("disk full on the state dir (3 MiB tmpfs)")
    clients = Clients(pki, server.url)
    try:
        with small_tmpfs(base / "disk-state", TMPFS_BYTES) as state:
            async with node_and_watch(pki, server, base, state, clients=clients) as (node, w):
                await w.place(AgentSpec(name="steady", argv=["sleep", "3600"], start_seconds=0))
                w.probing()
                for run in range(args.runs):
                    writer = await w.place(
                        AgentSpec(
                            name="writer",
                            argv=[sys.executable, "-c", LOG_WRITER],
                            start_seconds=0,
                            logs=LogSpec(max_bytes=LOG_MAX, backups=1),
                        )
                    )
                    seen = len(w.events.of("agent.logs_dropped", "writer"))
                    await until(
                        lambda s=seen: len(w.events.of("agent.logs_dropped", "writer")) > s,
                        within=15,
                    )
                    status = await w.agent("writer", StatusAgent(token=w.tok("read")))
                    row.check(status.status.pid == writer.pid, f"run {run}: the writer died")
                    await command(
                        w.op,
                        subjects.node_commands("n1"),
                        RemoveAgent(agent_id="writer", token=w.tok("agents:stop")),
                    )
                    filler = state / "filler"
                    fill(filler)
                    await w.agent("steady", RestartAgent(token=w.tok("agents:run")))
                    newcomer = await w.place(
                        AgentSpec(name=f"new-{run}", argv=["sleep", "3600"], start_seconds=0)
                    )
                    with contextlib.suppress(TimeoutError):
                        await until(
                            lambda n=newcomer.agent_id: bool(w.events.of("agent.state_unsaved", n)),
                            within=5,
                        )
                    filler.unlink()
                    with contextlib.suppress(TimeoutError):
                        await until(
                            lambda n=newcomer.agent_id: record(state, n) is not None, within=5
                        )
                    saved = record(state, newcomer.agent_id)
                    row.check(
                        saved is not None and saved["pid"] == newcomer.pid,
                        f"run {run}: the placement made while full was never saved",
                    )
                    row.runs += 1
                await w.stop_probing()
                w.judge(row)
                dropped = len(w.events.of("agent.logs_dropped"))
                unsaved = len(w.events.of("agent.state_unsaved"))
                resaved = len(w.events.of("agent.state_saved"))
                row.faults["disk-full spells"] += 2 * args.runs
                row.figures.append(
                    f"logs_dropped {dropped}, state_unsaved {unsaved}, state_saved {resaved}"
                )
                row.check(unsaved == resaved, f"{unsaved - resaved} records never saved again")
                row.check(node.alive(), "the node agent died")
                row.check(not list((state / "agents").glob("*.tmp")), "temp files left")
    finally:
        await clients.aclose()
    return row


SCENARIOS: dict[str, Callable[..., Any]] = {
    "flapping": flapping,
    "forkbomb": forkbomb,
    "slow": slow,
    "disk": disk,
}


def table(rows: list[Row]) -> str:
    head = (
        "scenario",
        "runs",
        "faults injected",
        "heartbeats (max gap)",
        "commands (worst)",
        "lost / late",
        "figures",
    )
    lines = [head] + [
        (
            r.scenario,
            str(r.runs),
            ", ".join(f"{n} {what}" for what, n in r.faults.items()) or "-",
            f"{r.beats} ({r.max_gap:.2f} s)",
            f"{r.commands} ({r.worst * 1000:.0f} ms)",
            "; ".join(r.lost) or "nothing",
            "; ".join(r.figures),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fabric-chaos-node-") as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki")
        server = NatsServer.local(pki.dir, base / "nats")
        await server.start()
        try:
            for name in args.only or list(SCENARIOS):
                scenario_dir = base / name
                scenario_dir.mkdir()
                print(f"running {name} ...", file=sys.stderr, flush=True)
                rows.append(await SCENARIOS[name](pki, server, scenario_dir, args))
        finally:
            await server.stop()
    print(table(rows))
    return 1 if any(r.lost for r in rows) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (3)")
    p.add_argument("--seconds", type=float, default=20.0, help="chaos per run (20 s)")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
