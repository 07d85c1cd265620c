"""Durable state and re-adoption: detach, kill -9 of the node agent, drain."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
from agents.harness import alive, fifo_line, policy, running, script, spec

from node_agent.state_store import AgentRecord, StateStore
from schemas.agent import AgentState as S

REPO = Path(__file__).resolve().parent.parent


def start_node(state: Path, fifo: Path, count: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(script("node.py", state, fifo, count), env=env, cwd=REPO)


def kill_9(node: subprocess.Popen[bytes]) -> None:
    node.send_signal(signal.SIGKILL)
    node.wait()  # no reaper runs in this process at this point


def test_state_store_round_trip_and_bad_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record = AgentRecord(spec=spec("a", ["true"]), epoch=2, pid=123, create_time=1.5)
    store.save(record)
    (store.dir / "broken.json").write_text("{not json")
    (store.dir / "b.json").write_bytes((store.dir / "a.json").read_bytes())  # name mismatch
    loaded = store.load_all()
    assert loaded == {"a": record}
    assert sorted(store.skipped) == ["b.json", "broken.json"]
    assert not list(store.dir.glob("*.tmp"))
    store.delete("a")
    store.delete("a")
    assert "a" not in store.load_all()


async def test_detach_then_readopt_same_pids(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup_a, _rec):
        pids = {}
        for name in ("x", "y", "z"):
            pids[name] = (await sup_a.place(spec(name, ["sleep", "100"]), epoch=4)).pid
        await sup_a.stop("z")
        await sup_a.shutdown("detach")
    assert all(alive(pids[n]) for n in ("x", "y"))
    async with running(tmp_path) as (sup_b, rec):
        by_id = {s.agent_id: s for s in sup_b.statuses()}
        for name in ("x", "y"):
            assert (by_id[name].state, by_id[name].pid) == (S.RUNNING, pids[name])
            assert (by_id[name].reason, by_id[name].epoch) == ("re-adopted", 4)
        assert by_id["z"].state is S.STOPPED  # a manual stop survives the restart
        assert [k for k, _, _ in rec.events].count("agent.readopted") == 2
        assert "agent.started" not in [k for k, _, _ in rec.events]
        # Re-adopted agents still stop (group signal, non-child exit via pidfd).
        stopped = await sup_b.stop("x")
        assert stopped.state is S.STOPPED
        assert not alive(pids["x"])


async def test_kill_9_of_node_agent_then_readopt(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    node = start_node(state, fifo, 3)
    try:
        pids = [int(p) for p in (await fifo_line(fifo, 20.0)).split()]
    finally:
        kill_9(node)
    assert len(pids) == 3
    assert all(alive(p) for p in pids)
    async with running(state, metrics_interval=0.1) as (sup, rec):
        statuses = {s.agent_id: s for s in sup.statuses()}
        assert sorted(s.pid for s in statuses.values()) == sorted(pids)  # type: ignore[type-var]
        assert {s.state for s in statuses.values()} == {S.RUNNING}
        assert "agent.started" not in [k for k, _, _ in rec.events]
        # The history the killed node agent recorded carries on: its first
        # moves, then the re-adoption on top (not a fresh "accepted").
        moves = [(t.to_state, t.reason) for t in statuses["a0"].history]
        assert [to for to, _ in moves[:2]] == [S.PENDING, S.STARTING], moves
        assert moves[-1] == (S.RUNNING, "re-adopted"), moves
        assert len(moves) >= 3, moves
        # The exit of a re-adopted process is noticed and handled by its policy.
        victim = statuses["a0"]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        exited = await rec.event("agent.exited", "a0")
        assert exited["signal"] in ("SIGKILL", None)  # None: not our child, status unknown
        restarted = await rec.event("agent.started", "a0")
        assert restarted["pid"] != victim.pid
        assert sup.status("a0").restarts == 1


async def test_drain_stops_all_and_next_node_agent_restarts_them(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup_a, _rec):
        first = await sup_a.place(spec("w", ["sleep", "100"], restart=policy("on-failure")))
        await sup_a.place(spec("done", ["true"], restart=policy("never")))
        await _rec.state("done", S.EXITED)
        await sup_a.shutdown("drain")
        assert sup_a.status("w").state is S.STOPPED
        assert sup_a.status("done").state is S.EXITED
    assert first.pid is not None and not alive(first.pid)
    async with running(tmp_path) as (sup_b, rec):
        w = sup_b.status("w")
        assert w.state is S.RUNNING
        assert w.pid != first.pid
        assert sup_b.status("done").state is S.EXITED
        assert rec.kinds("w")[-1] == "agent.started"


async def test_spawn_record_is_durable_before_place_returns(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        status = await sup.place(spec("d", ["sleep", "100"], start_seconds=5))
        record = StateStore(tmp_path).load_all()["d"]
        assert (record.pid, record.desired_running) == (status.pid, True)
        assert record.create_time == psutil.Process(status.pid).create_time()
        assert record.last_state == "starting"
