"""Long-form fleet-level chaos (issue 8) with real processes (not a test).

    python bench/chaos/fleet.py                       # all three, 3 runs each, ~4 minutes
    python bench/chaos/fleet.py --only cut --runs 10
    python bench/chaos/fleet.py --only readopt,host-kill --agents 50

Scenarios (the short forms are tests/test_node_service.py's
``test_kill_9_then_restart_readopts_every_agent``, tests/test_fleet.py and
tests/test_bed.py, whose helpers this imports):

readopt
    One real ``fabric-node`` on loopback with ``--agents`` agents placed by
    node commands (no controller). SIGKILL of the node agent alone, restarted
    at once on the same state dir: every agent must be re-adopted (the same
    pid, RUNNING in the new agent's heartbeat), no agent spawned again, and
    each agent's status history, restart count and ``since`` kept. Time:
    kill -> the first heartbeat of the new node agent listing every agent
    RUNNING with its old pid.
host-kill
    A netns bed (tests/hosts.py): host 0 runs the TLS nats-server and a real
    ``fabric controller run`` (defaults: heartbeat 0.5 s, ``node_timeout``
    1.5 s, reconcile every 0.25 s) and is never faulted; hosts 1-3 each run a
    ``fabric-node``. A deployment of ``--replicas`` copies (default
    ``start_seconds`` 1 s) is spread; then every process of the host holding
    the most is SIGKILLed (HostBed.kill). Time: kill -> the last affected
    replica's RUNNING status from another node. The host is started again
    (fresh state dir) before the next run.
cut
    The same bed. A singleton with ``on_partition: stop`` and a 3-replica
    ``keep`` deployment; the singleton's host is cut off (its link down at
    the switch: silence, no RST). Once every affected replica runs elsewhere
    the link is healed; the run goes on ``--settle`` seconds after the cut
    host's stale copies are gone. Time: cut -> the last replacement RUNNING.

A sampler reads every process of the machine (all hosts share one pid
namespace) every ~10 ms and records each instant at which one replica id ran
in two processes. Duplicate instants are counted: for ``stop`` singletons at
any time (target 0); for readopt and host-kill after the fault (target 0);
for the cut's ``keep`` replicas after the healed host has stopped its stale
copies (target 0). A ``keep`` copy runs on, by design, until its node, back
in contact, learns that it was replaced: the time from the heal to that
stop and the instants of two copies meanwhile are printed in their own
columns, not hidden, and do not fail the run.

readopt also checks the fleet's durable history: the EVENTS stream (made as
a controller makes it) must hold each agent's ``agent.started`` once and
``agent.readopted`` once. The node's own per-agent status history
(``AgentStatus.history``) is compared before and after: the old one must
be kept whole, with the re-adoption added as one more move (``since`` is
that move's time); an agent whose history did not survive counts in
"status history reset".

Prints a row per run and a summary table (scenario, runs, faults, agents
affected, lost, duplicate instants, time to recover p50/max). Exits 1 if
anything was lost or duplicated. Every process is stopped by pid and swept
by a per-run marker; every namespace is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The root first, even when PYTHONPATH holds it already: bench/node_agent.py
# must not shadow the node_agent package.
for entry in (str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)):
    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)

import nats.errors  # noqa: E402
import psutil  # noqa: E402
from _common import Marker, machine, pct, render_table  # noqa: E402
from agents.harness import until  # noqa: E402
from chaosnode import NodeProc, command, issuer  # noqa: E402
from fleetfixtures import ControllerProcs, CopySampler  # noqa: E402
from hosts import HostBed, leftovers, netns_unavailable  # noqa: E402
from natsfixtures import Clients, FabricPki, make_pki  # noqa: E402
from taskchaos import stored_events  # noqa: E402
from test_fleet import api, ready_nodes, where  # noqa: E402

from fabric.controller.streams import StreamSettings, ensure_state  # noqa: E402
from fabric.nats_server import NatsServer  # noqa: E402
from fabric.pki import init_pki, issue_identity  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.agent import AgentSpec, AgentState, AgentStatus  # noqa: E402
from schemas.codec import decode  # noqa: E402
from schemas.command import PlaceAgent, StatusAgent  # noqa: E402
from schemas.errors import ErrorReply  # noqa: E402
from schemas.node import NodeHeartbeat  # noqa: E402

# The controller's defaults (fabric.controller.service.ControllerConfig) and
# the spec's default start_seconds: the bound a replacement should meet.
NODE_TIMEOUT, HEARTBEAT, RECONCILE, START_SECONDS = 1.5, 0.5, 0.25, 1.0
BOUND = NODE_TIMEOUT + HEARTBEAT + RECONCILE + START_SECONDS
CLONE_NEWNET = 0x40000000
MADE: set[str] = set()  # every namespace of every bed this run built


async def wait_ready(nc: Any, wanted: set[str], within: float = 60) -> None:
    """test_fleet.wait_ready, through a controller not answering yet."""
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                if wanted <= await ready_nodes(nc):
                    return
            await asyncio.sleep(0.1)  # wait-ok: polling discovery under a deadline


# -- what is recorded ---------------------------------------------------------


class Sampler(CopySampler):
    """CopySampler that also keeps each instant a replica ran twice: (time, agent id)."""

    def __init__(self) -> None:
        super().__init__()
        self.dups: list[tuple[float, str]] = []

    def sample(self) -> dict[str, list[int]]:
        now = super().sample()
        t = time.monotonic()
        self.dups.extend((t, agent_id) for agent_id, pids in now.items() if len(pids) > 1)
        return now

    def dup_instants(self, ids: Callable[[str], bool], since: float = 0.0) -> int:
        return len({t for t, a in self.dups if t >= since and ids(a)})


@dataclass
class Run:
    scenario: str
    n: int
    fault: str
    affected: int = 0
    lost: list[str] = field(default_factory=list)
    dup_after: int = 0
    dup_stop: int | None = None
    history_reset: int = 0
    heal_window: float | None = None  # heal -> the healed host's stale copies stopped
    dup_window: int | None = None  # keep copies twice in that window
    recover: float | None = None
    notes: list[str] = field(default_factory=list)


# -- readopt (loopback) ---------------------------------------------------------


async def readopt(args: argparse.Namespace, base: Path, sampler: Sampler) -> list[Run]:
    pki = make_pki(base / "pki")
    server = NatsServer.local(pki.dir, base / "nats")
    await server.start()
    clients = Clients(pki, server.url)
    iss = issuer(pki)
    beats: list[NodeHeartbeat] = []
    runs: list[Run] = []

    async def on_beat(msg: Any) -> None:
        beats.append(decode(msg.data, NodeHeartbeat))

    def beat_of(pid: int) -> NodeHeartbeat | None:
        return next((b for b in reversed(beats) if b.pid == pid), None)

    node: NodeProc | None = None
    try:
        op = await clients("op-1")
        ctl = await clients("ctl-1")
        # The EVENTS stream (as a controller makes it) keeps the fleet's durable history.
        await ensure_state(ctl, ctl.jetstream(), StreamSettings())
        await op.subscribe(subjects.node_heartbeat("n1"), cb=on_beat)
        for n in range(args.runs):
            run = Run("readopt", n + 1, "SIGKILL of the node agent, restarted")
            state, log = base / f"node-{n}", base / f"node-{n}.log"
            node = NodeProc(pki, server.url, state, log)
            first = node.pid
            await until(lambda p=first: beat_of(p) is not None, within=30)
            names = [f"r{n}-{i}" for i in range(args.agents)]
            pids: dict[str, int] = {}
            for name in names:
                spec = AgentSpec(name=name, argv=sampler.sleeper, start_seconds=0)
                placed = await command(
                    op,
                    subjects.node_commands("n1"),
                    PlaceAgent(spec=spec, token=iss.mint("op-1", ["agents:run"])),
                )
                if isinstance(placed, ErrorReply):
                    raise RuntimeError(f"place {name}: {placed}")
                pids[name] = placed.status.pid

            async def statuses(names: list[str] = names) -> dict[str, AgentStatus]:
                out = {}
                for name in names:
                    reply = await command(
                        op,
                        subjects.agent_commands(name),
                        StatusAgent(token=iss.mint("op-1", ["read"])),
                    )
                    out[name] = reply.status
                return out

            before = await statuses()
            run.affected = len(names)
            mark = time.monotonic()
            os.kill(first, signal.SIGKILL)
            node.proc.wait(timeout=10)
            node = NodeProc(pki, server.url, state, log)
            second = node.pid

            def readopted(p: int = second, pids: dict[str, int] = pids) -> bool:
                b = beat_of(p)
                return (
                    b is not None
                    and {a.agent_id: a.pid for a in b.agents if a.state is AgentState.RUNNING}
                    == pids
                )

            try:
                await until(readopted, within=30, step=0.02)
                run.recover = time.monotonic() - mark
            except TimeoutError:
                b = beat_of(second)
                seen = {a.agent_id: a.pid for a in b.agents} if b else {}
                run.lost += [a for a in names if seen.get(a) != pids[a]]
            after = await statuses()
            for name in names:
                old, new = before[name], after[name]
                if new.pid != pids[name] or new.state is not AgentState.RUNNING:
                    run.lost.append(f"{name}: pid {pids[name]} -> {new.pid} {new.state.value}")
                elif (new.restarts, new.epoch) != (old.restarts, old.epoch):
                    run.lost.append(f"{name}: restarts/epoch changed")
                elif new.history[: len(old.history)] != old.history or (
                    new.history[-1].reason != "re-adopted"
                ):
                    # The node's own transition list (AgentStatus.history) must go
                    # on where it was, with the re-adoption as one more move
                    # (`since` is that move's time).
                    run.history_reset += 1
            # Any pid other than the original ones running one of these agents
            # is a respawn, even if it never overlapped.
            respawned = sum(len(sampler.pids[a] - {pids[a]}) for a in names)
            if respawned:
                run.lost.append(f"{respawned} agents spawned again")
            # The fleet's durable history: EVENTS holds each agent's start and re-adoption.
            started = await stored_events(ctl, subjects.event("agent.started"), within=30)
            again = await stored_events(ctl, subjects.event("agent.readopted"), within=30)
            missing = [a for a in names if (started[a], again[a]) != (1, 1)]
            run.lost += [
                f"{a}: in EVENTS {started[a]} started, {again[a]} readopted" for a in missing
            ]
            run.notes.append(
                f"EVENTS: {sum(started[a] for a in names)} agent.started,"
                f" {sum(again[a] for a in names)} agent.readopted"
            )
            run.dup_after = sampler.dup_instants(lambda a, ns=set(names): a in ns, since=mark)
            if run.history_reset:
                run.notes.append(
                    f"node-side status history (transitions, since) reset for {run.history_reset}"
                )
            await node.stop()  # drains: the agents stop with it
            node = None
            runs.append(run)
            print_run(run)
    finally:
        if node is not None:
            await node.stop()
        await clients.aclose()
        await server.stop()
    return runs


# -- the netns bed ----------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class BedFabric:
    """HostBed(4): host 0 = nats-server + controller (and this script's clients), 1-3 = nodes.

    This thread enters host 0's network namespace (setns) for the duration,
    so its NATS clients, the server and the controller it starts live there.
    """

    NODES = ("n1", "n2", "n3")

    def __init__(self, base: Path, sampler: Sampler) -> None:
        self.base = base
        self.sampler = sampler
        self.bed = HostBed(4)
        MADE.update([*(h.netns for h in self.bed.hosts), self.bed.switch])
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = defaultdict(int)
        self.status: dict[str, list[tuple[float, AgentStatus]]] = defaultdict(list)
        self._home: int | None = None
        self.server: NatsServer | None = None
        self.controllers: ControllerProcs | None = None
        self.clients: Clients | None = None

    def index(self, node_id: str) -> int:
        return self.NODES.index(node_id) + 1

    async def __aenter__(self) -> BedFabric:
        self.bed.__enter__()
        try:
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            infra = self.bed.hosts[0]
            fd = os.open(f"/run/netns/{infra.netns}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            pki_dir = self.base / "pki"
            init_pki(pki_dir, hosts=[infra.address])
            roles = {"ctl-1": "controller", "op-1": "operator"} | dict.fromkeys(self.NODES, "node")
            self.pki = FabricPki(
                dir=pki_dir,
                identities={n: issue_identity(pki_dir, r, n) for n, r in roles.items()},
            )
            self.server = NatsServer.local(pki_dir, self.base / "nats", host=infra.address)
            await self.server.start()
            self.controllers = ControllerProcs(self.pki, self.base)
            self.controllers.start("ctl-chaos", [self.server.url])
            self.clients = Clients(self.pki, self.server.url)
            self.op = await self.clients("op-1")
            self.iss = issuer(self.pki)
            await self.op.subscribe("agents.*.status", cb=self._on_status)
            for node_id in self.NODES:
                self.start_node(node_id)
            await wait_ready(self.op, set(self.NODES), within=60)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _on_status(self, msg: Any) -> None:
        with contextlib.suppress(Exception):
            status = decode(msg.data, AgentStatus)
            self.status[status.agent_id].append((time.monotonic(), status))

    def start_node(self, node_id: str) -> None:
        assert self.server is not None
        self.starts[node_id] += 1
        ident = self.pki[node_id]
        env = {
            **os.environ,
            "FABRIC_NATS_URL": self.server.url,
            "FABRIC_CA": str(self.pki.ca),
            "FABRIC_CERT": str(ident.cert),
            "FABRIC_KEY": str(ident.key),
        }
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(self.base / f"{node_id}-{self.starts[node_id]}"),
            "--token-key", str(self.pki.dir / "signing.pub"),
        ]  # fmt: skip
        host = self.bed.hosts[self.index(node_id)]
        with (self.base / f"{node_id}.log").open("ab") as log:
            self.nodes[node_id] = host.popen(argv, env=env, stdout=log, stderr=log)

    def running_since(self, agent_id: str, since: float, not_on: str) -> float | None:
        for t, s in self.status[agent_id]:
            if t >= since and s.state is AgentState.RUNNING and s.node_id != not_on:
                return t
        return None

    def running_on(self, agent_id: str, node_id: str | None) -> bool:
        """The last status of ``agent_id`` from ``node_id`` says RUNNING.

        Per node: a stale copy's last word (stopped, from the healed host) may
        arrive after its replacement's RUNNING.
        """
        mine = [s for _, s in self.status[agent_id] if s.node_id == node_id]
        return bool(mine) and mine[-1].state is AgentState.RUNNING

    async def deploy(self, name: str, replicas: int, **spec: Any) -> dict[str, str]:
        body = {"spec": {"name": name, "argv": self.sampler.sleeper, **spec}, "replicas": replicas}
        await api(self.op, self.iss, "create", {"deployment": body}, "agents:run")

        async def placed() -> dict[str, str] | None:
            now = await where(self.op, self.iss, name)
            if len(now) == replicas and all(
                n is not None and self.running_on(a, n) for a, n in now.items()
            ):
                return {a: str(n) for a, n in now.items()}
            return None

        async with asyncio.timeout(60):
            while (got := await placed()) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # wait-ok: polling the API under a deadline
        return got

    async def delete(self, name: str) -> None:
        await api(self.op, self.iss, "delete", {"name": name}, "agents:stop")

        def gone() -> bool:
            return not any(a == name or a.startswith(f"{name}-") for a in self.sampler.sample())

        await until(gone, within=30)

    async def __aexit__(self, *exc: object) -> None:
        try:
            live = [p for p in self.nodes.values() if p.poll() is None]
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await until(lambda: all(p.poll() is not None for p in live), within=20)
            for proc in live:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if self.controllers is not None:
                await self.controllers.stop_all()
            if self.clients is not None:
                await self.clients.aclose()
            if self.server is not None:
                await self.server.stop()
        finally:
            if self._home is not None:
                _setns(self._home)
                os.close(self._home)
                self._home = None
            self.bed.close()


async def host_kill(args: argparse.Namespace, base: Path, sampler: Sampler) -> list[Run]:
    runs: list[Run] = []
    async with BedFabric(base, sampler) as fab:
        for n in range(args.runs):
            run = Run("host-kill", n + 1, "SIGKILL of every process of a host")
            await wait_ready(fab.op, set(fab.NODES), within=60)
            name = f"hk{n}"
            placed = await fab.deploy(name, args.replicas)
            load = {node: sum(1 for v in placed.values() if v == node) for node in fab.NODES}
            most = [node for node in fab.NODES if load[node] == max(load.values())]
            victim = most[n % len(most)]  # a different host each run when the spread is even
            affected = [a for a, v in placed.items() if v == victim]
            run.affected = len(affected)
            killed = len(fab.bed.hosts[fab.index(victim)].pids())
            mark = time.monotonic()
            fab.bed.kill(fab.index(victim))
            fab.nodes[victim].wait(timeout=10)
            run.fault += f" ({victim}: {killed} processes)"

            def replaced(since: float = mark, ids: list[str] = affected, v: str = victim) -> bool:
                return all(fab.running_since(a, since, v) is not None for a in ids)

            with contextlib.suppress(TimeoutError):
                await until(replaced, within=30, step=0.02)
            times = [fab.running_since(a, mark, victim) for a in affected]
            run.lost += [a for a, t in zip(affected, times, strict=True) if t is None]
            if not run.lost:
                run.recover = max(t for t in times if t is not None) - mark
            now = await where(fab.op, fab.iss, name)
            run.lost += [a for a in affected if now.get(a) in (None, victim)]
            ids = set(placed)
            run.dup_after = sampler.dup_instants(lambda a, ids=ids: a in ids, since=mark)
            late = [t - mark for t in times if t is not None and t - mark > BOUND]
            if late:
                run.notes.append(f"{len(late)} later than {BOUND:g} s")
            await fab.delete(name)
            fab.start_node(victim)
            runs.append(run)
            print_run(run)
    return runs


async def cut(args: argparse.Namespace, base: Path, sampler: Sampler) -> list[Run]:
    runs: list[Run] = []
    async with BedFabric(base, sampler) as fab:
        for n in range(args.runs):
            run = Run("cut", n + 1, "network cut of a host, healed")
            await wait_ready(fab.op, set(fab.NODES), within=60)
            solo, keep = f"cs{n}", f"ck{n}"
            start = time.monotonic()
            placed = await fab.deploy(solo, 1, on_partition="stop")
            victim = placed[solo]
            placed |= await fab.deploy(keep, 3)
            affected = [a for a, v in placed.items() if v == victim]
            run.affected = len(affected)
            stale = {a: sampler.sample()[a] for a in affected}
            mark = time.monotonic()
            fab.bed.cut(fab.index(victim))
            run.fault += f" ({victim})"
            try:

                def replaced(s: float = mark, ids: list[str] = affected, v: str = victim) -> bool:
                    return all(fab.running_since(a, s, v) is not None for a in ids)

                with contextlib.suppress(TimeoutError):
                    await until(replaced, within=30, step=0.02)
                times = [fab.running_since(a, mark, victim) for a in affected]
                run.lost += [a for a, t in zip(affected, times, strict=True) if t is None]
                if not run.lost:
                    run.recover = max(t for t in times if t is not None) - mark
            finally:
                fab.bed.heal(fab.index(victim))
            healed = time.monotonic()

            def stale_gone(old: dict[str, list[int]] = stale) -> bool:
                now = sampler.sample()
                return not any(set(pids) & set(now.get(a, [])) for a, pids in old.items())

            try:
                await until(stale_gone, within=30, step=0.02)
                gone = time.monotonic()
                run.heal_window = gone - healed
            except TimeoutError:
                gone = time.monotonic()
                run.lost.append("stale copies still running 30 s after the heal")
            await wait_ready(fab.op, set(fab.NODES), within=60)
            await asyncio.sleep(args.settle)  # watch for late duplicates
            now = await where(fab.op, fab.iss, keep) | await where(fab.op, fab.iss, solo)
            copies = sampler.sample()
            run.lost += [
                a
                for a in placed
                if not fab.running_on(a, now.get(a)) or len(copies.get(a, [])) != 1
            ]
            keeps = {a for a in placed if a != solo}
            window = sampler.dup_instants(lambda a, k=keeps: a in k, since=healed)
            run.dup_after = sampler.dup_instants(lambda a, k=keeps: a in k, since=gone)
            run.dup_stop = sampler.dup_instants(lambda a, s=solo: a == s, since=start)
            run.dup_window = window - run.dup_after
            during = sampler.dup_instants(lambda a, k=keeps: a in k, since=mark) - window
            run.notes.append(f"keep copies twice in {during} instants while cut (expected)")
            await fab.delete(solo)
            await fab.delete(keep)
            runs.append(run)
            print_run(run)
    return runs


# -- report -----------------------------------------------------------------------

SCENARIOS: dict[str, Callable[..., Any]] = {
    "readopt": readopt,
    "host-kill": host_kill,
    "cut": cut,
}


def print_run(r: Run) -> None:
    recover = f"{r.recover:.2f} s" if r.recover is not None else "-"
    print(
        f"{r.scenario} run {r.n}: {r.fault}, {r.affected} affected, lost {len(r.lost)},"
        f" duplicate instants {r.dup_after}"
        + (f" (stop singleton ever: {r.dup_stop})" if r.dup_stop is not None else "")
        + (
            f", stale copies stopped {r.heal_window:.2f} s after the heal"
            f" ({r.dup_window} instants of two keep copies meanwhile)"
            if r.heal_window is not None
            else ""
        )
        + f", recovered in {recover}; {'; '.join(r.notes)}"
        + (f"; LOST: {r.lost}" if r.lost else ""),
        flush=True,
    )


RUN_HEADERS = [
    "scenario",
    "run",
    "fault",
    "affected",
    "lost",
    "history reset",
    "dup after fault / stale stop",
    "dup heal..stale stop (keep)",
    "dup ever (stop)",
    "recover s",
    "heal..stale stop s",
    "notes",
]
SUMMARY_HEADERS = [
    "scenario",
    "runs",
    "faults injected",
    "agents affected",
    "lost",
    "status history reset",
    "duplicate instants after the fault (cut: after the stale copies stopped)",
    "keep copies twice between heal and stale stop",
    "duplicate instants ever (stop)",
    "time to recover",
    "heal -> stale copies stopped",
]


def run_row(r: Run) -> list[str]:
    return [
        r.scenario,
        str(r.n),
        r.fault,
        str(r.affected),
        str(len(r.lost)),
        str(r.history_reset) if r.scenario == "readopt" else "-",
        str(r.dup_after),
        "-" if r.dup_window is None else str(r.dup_window),
        "-" if r.dup_stop is None else str(r.dup_stop),
        "-" if r.recover is None else f"{r.recover:.2f}",
        "-" if r.heal_window is None else f"{r.heal_window:.2f}",
        "; ".join(r.notes),
    ]


def summary_row(name: str, rs: list[Run]) -> list[str]:
    rec = [r.recover for r in rs if r.recover is not None]
    stop = [r.dup_stop for r in rs if r.dup_stop is not None]
    win = [r.dup_window for r in rs if r.dup_window is not None]
    heal = [r.heal_window for r in rs if r.heal_window is not None]
    return [
        name,
        str(len(rs)),
        f"{len(rs)} x {rs[0].fault.split(' (')[0]}" if rs else "-",
        str(sum(r.affected for r in rs)),
        str(sum(len(r.lost) for r in rs)),
        str(sum(r.history_reset for r in rs)) if name == "readopt" else "-",
        str(sum(r.dup_after for r in rs)),
        str(sum(win)) if win else "-",
        str(sum(stop)) if stop else "-",
        f"p50 {pct(rec, 50):.2f} s, max {max(rec):.2f} s" if rec else "-",
        f"p50 {pct(heal, 50):.2f} s, max {max(heal):.2f} s" if heal else "-",
    ]


async def main_async(args: argparse.Namespace) -> int:
    marker = Marker()
    marker.install()
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    why = netns_unavailable()
    results: dict[str, list[Run]] = {}
    sampler = Sampler()
    sampling = asyncio.create_task(sampler.run())
    try:
        with tempfile.TemporaryDirectory(prefix="fabric-chaos-fleet-") as tmp_dir:
            tmp = args.keep_logs or tmp_dir
            for name in chosen:
                if name != "readopt" and why is not None:
                    print(f"{name}: skipped, no netns bed here ({why})", flush=True)
                    continue
                scenario_dir = Path(tmp) / name
                scenario_dir.mkdir(parents=True)
                print(f"running {name} ...", file=sys.stderr, flush=True)
                results[name] = await SCENARIOS[name](args, scenario_dir, sampler)
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        for pids in sampler.pids.values():
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
        left = marker.sweep()
        if left:
            print(f"killed leftovers: {left}")
    all_runs = [r for rs in results.values() for r in rs]
    print()
    print(render_table(RUN_HEADERS, [run_row(r) for r in all_runs]))
    summary = [summary_row(name, rs) for name, rs in results.items()]
    print()
    print(render_table(SUMMARY_HEADERS, summary))
    print(f"\nmachine: {machine()}")
    ours = sorted(set(leftovers()) & MADE)
    if ours:
        print(f"namespaces left behind: {ours}")
    bad = any(r.lost or r.history_reset or r.dup_after or r.dup_stop for r in all_runs)
    return 1 if bad or ours else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (3)")
    p.add_argument("--agents", type=int, default=20, help="agents on the node for readopt (20)")
    p.add_argument("--replicas", type=int, default=6, help="replicas for host-kill (6)")
    p.add_argument(
        "--keep-logs", help="a directory to keep logs and state in (default: a temp dir)"
    )
    p.add_argument("--settle", type=float, default=3.0, help="watched after a heal (3 s)")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
