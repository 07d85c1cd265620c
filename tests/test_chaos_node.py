"""Node-side chaos (issue 8), short forms; long forms in ``bench/chaos/node.py``.

Each scenario runs a real ``fabric-node`` process against the module's TLS
nats-server, with real children, and watches it from outside the way a
controller or dashboard would: heartbeats as received (the largest gap),
commands sent every 200 ms (the slowest reply), CloudEvents.

* A flapping agent that crashes every 50 ms (restart ``always``, retry for
  ever) with exponential backoff, a second one with no backoff at all, and a
  fork bomb under a ``pids`` limit: the node keeps its heartbeat, answers
  commands, the backoff sequence holds, the bomb stays under its limit and
  is stopped with nothing left behind.
* The node's state dir on a small tmpfs that fills up: errors are logged and
  published as events, the node and its agents live on, and once space is
  back state writes resume and a new placement works.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from agents.harness import AGENTS, until
from chaosnode import (
    Beats,
    Events,
    NodeProc,
    Prober,
    command,
    issuer,
    spare_user,
    user_pids,
)
from nats.aio.msg import Msg
from natsfixtures import Clients, FabricPki

from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer
from node_agent.cgroup import CgroupTree, find_cgroup2_mount, own_cgroup_path
from node_agent.limits import plan_limits, rlimits_for, runs_unprivileged
from schemas import subjects
from schemas.agent import (
    AgentSpec,
    AgentState,
    Backoff,
    LimitMechanism,
    Limits,
    LogSpec,
    RestartPolicy,
    RestartPolicyKind,
)
from schemas.command import ListAgents, PlaceAgent, RestartAgent, StatusAgent, StopAgent
from schemas.errors import ErrorReply

HEARTBEAT = 0.5  # the fabric's default interval
# A heartbeat later than this is a stall (issue 8: "heartbeats on time"): three
# intervals is the controller's default node_timeout, after which it is lost.
MAX_GAP = 3 * HEARTBEAT
# A status command slower than this is a node that stopped answering.
MAX_REPLY = 1.0
PIDS = 24
# Readable by any user, unlike a venv under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
async def ops(pki: FabricPki, nats_server: NatsServer) -> AsyncIterator[Clients]:
    clients = Clients(pki, default_urls=nats_server.url)
    try:
        yield clients
    finally:
        await clients.aclose()


@contextlib.asynccontextmanager
async def node_process(
    pki: FabricPki, server: NatsServer, state_dir: Path, log_path: Path
) -> AsyncIterator[NodeProc]:
    node = NodeProc(pki, server.url, state_dir, log_path, heartbeat=HEARTBEAT)
    try:
        yield node
    finally:
        code = await node.stop()
        assert code == 0, f"fabric-node exited {code}:\n{node.log()[-3000:]}"


def tok(iss: TokenIssuer, *scopes: str) -> str:
    return iss.mint("op-1", list(scopes))


def flapper(name: str, backoff: Backoff) -> AgentSpec:
    return AgentSpec(
        name=name,
        argv=["/bin/sh", "-c", "sleep 0.05; exit 3"],
        start_seconds=0,
        stop_timeout=1,
        restart=RestartPolicy(
            policy=RestartPolicyKind.ALWAYS, backoff=backoff, max_restarts=-1, window=60
        ),
    )


def bomb_spec(name: str, user: str | None) -> AgentSpec:
    return AgentSpec(
        name=name,
        # Another user may not read the test venv's interpreter (under /root).
        argv=[sys.executable if user is None else SYSTEM_PYTHON, str(AGENTS / "forkbomb.py")],
        user=user,
        cwd="/",
        start_seconds=0,
        stop_timeout=2,
        limits=Limits(pids=PIDS),
        restart=RestartPolicy(policy=RestartPolicyKind.NEVER),
    )


def pids_by_cgroup() -> bool:
    tree = CgroupTree.detect(name=f"fabric-probe-{uuid.uuid4().hex[:8]}")
    if tree is None:
        return False
    tree.remove_base()
    return "pids" in tree.controllers


def bomb_cgroup(pid: int) -> Path:
    """The ``cgroup.procs`` file of the cgroup v2 ``pid`` is in."""
    mount = find_cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    own = own_cgroup_path(Path(f"/proc/{pid}/cgroup").read_text())
    assert mount is not None and own is not None
    return mount / own.lstrip("/") / "cgroup.procs"


def backoff_gaps(events: Events, agent: str) -> list[tuple[float, float]]:
    """(decided delay, time from exit to the next start) for each restart seen."""
    exited = events.of("agent.exited", agent)
    restarting = events.of("agent.restarting", agent)
    started = events.of("agent.started", agent)
    out = []
    for i, r in enumerate(restarting):
        if i >= len(exited) or i + 1 >= len(started):
            break
        gap = (started[i + 1].time - exited[i].time).total_seconds()
        out.append((float(r.data["delay"]), gap))
    return out


async def test_flapping_agents_and_a_fork_bomb_leave_the_node_responsive(
    pki: FabricPki, nats_server: NatsServer, ops: Clients, tmp_path: Path
) -> None:
    by_cgroup = pids_by_cgroup()
    user = None if by_cgroup else spare_user()
    if user is not None and not os.path.exists(SYSTEM_PYTHON):  # noqa: ASYNC240 - one stat
        user = None
    iss = issuer(pki)
    nc = await ops("op-1")
    beats, events = Beats(), Events()
    await beats.start(nc, "n1")
    await events.start(nc, "events.agent.>")
    node_subject = subjects.node_commands("n1")
    async with node_process(pki, nats_server, tmp_path / "state", tmp_path / "node.log"):
        await until(lambda: len(beats.at) >= 2, within=10)
        backoff = Backoff(initial=0.05, max=0.4, multiplier=2.0, jitter=0.0)
        for spec in (flapper("flap", backoff), flapper("flap-fast", Backoff(0, 0, 1, 0))):
            placed = await command(
                nc, node_subject, PlaceAgent(spec=spec, token=tok(iss, "agents:run"))
            )
            assert not isinstance(placed, ErrorReply), placed
        bombing = user is not None or by_cgroup
        if bombing:
            placed = await command(
                nc,
                node_subject,
                PlaceAgent(spec=bomb_spec("bomb", user), token=tok(iss, "agents:run")),
            )
            assert not isinstance(placed, ErrorReply), placed
            assert placed.status.limits["pids"] is (
                LimitMechanism.CGROUP if by_cgroup else LimitMechanism.RLIMIT
            )
            bomb_pid = placed.status.pid

            members = bomb_cgroup(bomb_pid) if by_cgroup else None

        def bomb_procs() -> list[int]:
            if members is not None:
                with contextlib.suppress(OSError):
                    return [int(x) for x in members.read_text().split()]
                return []
            return user_pids(user) if user else []

        most_bombs = 0
        probe = Prober(
            nc, subjects.agent_commands("flap"), lambda: StatusAgent(token=tok(iss, "read"))
        )
        lister = Prober(nc, node_subject, lambda: ListAgents(token=tok(iss, "read")))
        mark = beats.mark()
        probe.start(), lister.start()
        loop = asyncio.get_running_loop()
        try:
            end = loop.time() + 6.0
            while loop.time() < end:
                if bombing:
                    most_bombs = max(most_bombs, len(bomb_procs()))
                await asyncio.sleep(0.05)  # wait-ok: the sampling period of a fixed window
        finally:
            await probe.stop()
            await lister.stop()

        gap = beats.max_gap(mark)
        print(
            f"heartbeat max gap {gap:.3f}s, status p_max {probe.worst * 1000:.1f} ms, "
            f"list p_max {lister.worst * 1000:.1f} ms, bomb max procs {most_bombs}, "
            f"flap restarts {len(events.of('agent.restarting', 'flap'))}, "
            f"flap-fast restarts {len(events.of('agent.restarting', 'flap-fast'))}"
        )
        assert gap < MAX_GAP, f"heartbeat gap {gap:.3f}s"
        assert not probe.failures and not lister.failures, (probe.failures, lister.failures)
        assert len(probe.latencies) >= 20 and len(lister.latencies) >= 20
        assert probe.worst < MAX_REPLY and lister.worst < MAX_REPLY, (probe.worst, lister.worst)

        # Backoff holds: the decided delays are the configured sequence, and
        # no restart came sooner than its delay.
        gaps = backoff_gaps(events, "flap")
        assert len(gaps) >= 8, gaps
        expected = [min(0.4, 0.05 * 2**n) for n in range(len(gaps))]
        assert [d for d, _ in gaps] == pytest.approx(expected), gaps
        assert all(gap >= delay - 0.005 for delay, gap in gaps), gaps
        fast = events.of("agent.started", "flap-fast")
        assert len(fast) >= 20, "the zero-backoff flapper did not flap"

        if bombing:
            status = await command(
                nc, subjects.agent_commands("bomb"), StatusAgent(token=tok(iss, "read"))
            )
            assert status.status.state is AgentState.RUNNING
            assert 2 <= most_bombs <= PIDS, most_bombs
            stopped = await command(
                nc, subjects.agent_commands("bomb"), StopAgent(token=tok(iss, "agents:stop"))
            )
            assert stopped.status.state is AgentState.STOPPED
            await until(lambda: not bomb_procs(), within=5)
            assert not psutil.pid_exists(bomb_pid) or psutil.Process(bomb_pid).status() == "zombie"
        for name in ("flap", "flap-fast"):
            stopped = await command(
                nc, subjects.agent_commands(name), StopAgent(token=tok(iss, "agents:stop"))
            )
            assert stopped.status.state is AgentState.STOPPED
    if not bombing:
        pytest.skip("fork bomb part skipped: no cgroup pids controller and no spare user")


def test_pids_limit_falls_back_to_rlimit_nproc_for_an_agent_with_its_own_user() -> None:
    limits = Limits(pids=PIDS, open_files=64)
    plan = plan_limits(limits, frozenset(), unprivileged=True)
    assert plan["pids"] is LimitMechanism.RLIMIT
    assert (resource.RLIMIT_NPROC, PIDS, PIDS) in rlimits_for(limits, plan)
    # Root is exempt from RLIMIT_NPROC, and an agent sharing the node agent's
    # user would count the node agent's processes too: no rlimit then.
    shared = plan_limits(limits, frozenset(), unprivileged=False)
    assert shared["pids"] is LimitMechanism.NONE
    assert all(r[0] != resource.RLIMIT_NPROC for r in rlimits_for(limits, shared))
    assert plan_limits(limits, frozenset({"pids"}), unprivileged=True)["pids"] is (
        LimitMechanism.CGROUP
    )
    assert not runs_unprivileged(None) and not runs_unprivileged("root")
    assert runs_unprivileged("nobody")


LOG_WRITER = (
    "import os, time\n"
    "block = (b'x' * 1023 + b'\\n') * 64\n"
    "while True:\n"
    "    try:\n"
    "        os.write(1, block)\n"
    "    except OSError:\n"
    "        pass  # disk full: carry on, as a service would\n"
    "    time.sleep(0.02)\n"
)
TMPFS_BYTES = 3 << 20
LOG_MAX = 512 << 10


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write zeros into ``path`` until the disk is full; bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    written += f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


def record(state_dir: Path, agent_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / "agents" / f"{agent_id}.json").read_bytes())
    except FileNotFoundError:
        return None


async def test_disk_full_on_the_state_dir_is_survived_and_recovered_from(
    pki: FabricPki, nats_server: NatsServer, ops: Clients, tmp_path: Path
) -> None:
    iss = issuer(pki)
    nc = await ops("op-1")
    beats, events = Beats(), Events()
    await beats.start(nc, "n1")
    await events.start(nc, "events.agent.>")
    node_subject = subjects.node_commands("n1")

    async def place(spec: AgentSpec) -> Any:
        placed = await command(
            nc, node_subject, PlaceAgent(spec=spec, token=tok(iss, "agents:run"))
        )
        assert not isinstance(placed, ErrorReply), placed
        return placed.status

    async def status(agent_id: str) -> Any:
        reply = await command(
            nc, subjects.agent_commands(agent_id), StatusAgent(token=tok(iss, "read"))
        )
        return reply.status

    with small_tmpfs(tmp_path / "state", TMPFS_BYTES) as state:
        async with node_process(pki, nats_server, state, tmp_path / "node.log") as node:
            await until(lambda: len(beats.at) >= 2, within=10)
            steady = await place(AgentSpec(name="steady", argv=["sleep", "600"], start_seconds=0))
            # 1. An agent's own log fills the disk (3 MiB/s into 512 KiB files, one backup).
            writer = await place(
                AgentSpec(
                    name="writer",
                    argv=[sys.executable, "-c", LOG_WRITER],
                    start_seconds=0,
                    logs=LogSpec(max_bytes=LOG_MAX, backups=1),
                )
            )
            mark = beats.mark()
            await until(lambda: bool(events.of("agent.logs_dropped", "writer")), within=10)
            dropped = events.of("agent.logs_dropped", "writer")[0]
            assert "No space left" in dropped.data["error"], dropped.data
            logs = state / "logs" / "writer"
            live = logs / "stdout.log"
            # The live file was cut (the disk is not held full), and the agent logs on.
            await until(lambda: 0 < live.stat().st_size <= LOG_MAX, within=5, step=0.005)
            await until(lambda: live.stat().st_size > 0, within=5)
            assert (await status("writer")).pid == writer.pid
            stopped = await command(
                nc, subjects.agent_commands("writer"), StopAgent(token=tok(iss, "agents:stop"))
            )
            assert stopped.status.state is AgentState.STOPPED
            # A backup is whole (a file is rotated once past LOG_MAX) or absent, never partial.
            backup = logs / "stdout.log.1"
            assert not backup.exists() or backup.stat().st_size > LOG_MAX
            assert not list(logs.glob("*.tmp"))

            # 2. Someone else fills the disk: state writes fail, loudly, and nothing else.
            filler = state / "filler"
            assert fill(filler) > 0
            restarted = await command(
                nc, subjects.agent_commands("steady"), RestartAgent(token=tok(iss, "agents:run"))
            )
            assert restarted.status.state is AgentState.RUNNING
            assert restarted.status.pid != steady.pid
            await until(lambda: bool(events.of("agent.state_unsaved", "steady")), within=5)
            unsaved = events.of("agent.state_unsaved", "steady")[0]
            assert "No space left" in unsaved.data["error"]
            assert record(state, "steady")["pid"] == steady.pid  # the old record, untouched
            newcomer = await place(
                AgentSpec(name="newcomer", argv=["sleep", "600"], start_seconds=0)
            )
            assert newcomer.state is AgentState.RUNNING
            await until(lambda: bool(events.of("agent.state_unsaved", "newcomer")), within=5)
            assert record(state, "newcomer") is None
            await until(lambda: "cannot save the state of newcomer" in node.log(), within=5)
            assert (await status("steady")).message.startswith("state not saved")
            assert not list((state / "agents").glob("*.tmp")), "temp files hold the full disk"
            gap = beats.max_gap(mark)
            assert gap < MAX_GAP, f"heartbeat gap {gap:.3f}s while the disk was full"
            assert node.alive()

            # 3. Space comes back: the unsaved records are written on the next tick.
            filler.unlink()
            await until(
                lambda: (
                    bool(events.of("agent.state_saved", "newcomer"))
                    and bool(events.of("agent.state_saved", "steady"))
                ),
                within=5,
            )
            assert record(state, "newcomer")["pid"] == newcomer.pid
            assert record(state, "steady")["pid"] == restarted.status.pid
            after = await place(AgentSpec(name="after", argv=["sleep", "600"], start_seconds=0))
            assert after.state is AgentState.RUNNING
            assert record(state, "after")["pid"] == after.pid
            assert (await status("steady")).message == ""
            assert node.alive()
            pids = [restarted.status.pid, newcomer.pid, after.pid]
            assert all(psutil.pid_exists(pid) for pid in pids)
        # The node drained: nothing it ran is left.
        assert not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
        )


# 2 KB lines at ~3 MB/s: the node reads the log every 0.5 s, so one batch gets
# ~750 lines (under the 1,000-line cap), 1.5 MB: over max_payload.
LONG_LINES = (
    "import sys, time\n"
    "line = 'z' * 1999 + '\\n'\n"
    "while True:\n"
    "    sys.stdout.write(line * 60)\n"
    "    sys.stdout.flush()\n"
    "    time.sleep(0.04)\n"
)


async def test_published_logs_of_long_lines_never_stall_the_heartbeat(
    pki: FabricPki, nats_server: NatsServer, ops: Clients, tmp_path: Path
) -> None:
    iss = issuer(pki)
    nc = await ops("view-1")
    op = await ops("op-1")
    beats = Beats()
    await beats.start(nc, "n1")
    sizes: list[int] = []

    async def on_logs(msg: Msg) -> None:
        sizes.append(len(msg.data))

    await nc.subscribe(subjects.agent_logs("long"), cb=on_logs)
    async with node_process(pki, nats_server, tmp_path / "state", tmp_path / "node.log") as node:
        await until(lambda: len(beats.at) >= 2, within=10)
        spec = AgentSpec(
            name="long",
            argv=[sys.executable, "-c", LONG_LINES],
            start_seconds=0,
            logs=LogSpec(publish=True, max_bytes=4 << 20, backups=0),
        )
        placed = await command(
            op, subjects.node_commands("n1"), PlaceAgent(spec=spec, token=tok(iss, "agents:run"))
        )
        assert not isinstance(placed, ErrorReply), placed
        mark = beats.mark()
        await until(lambda: len(sizes) >= 5, within=15)
        await until(lambda: len(beats.at) >= mark + 10, within=10)
        gap = beats.max_gap(mark)
        assert gap < MAX_GAP, f"heartbeat gap {gap:.3f}s"
        assert max(sizes) <= nc.max_payload
        assert "cannot publish" not in node.log()
