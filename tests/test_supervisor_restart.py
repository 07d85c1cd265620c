"""Restart policies with real processes: new pids, backoff delays, intensity, stop rules."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agents.harness import alive, policy, running, spec

from schemas.agent import AgentState as S
from schemas.agent import Backoff


async def test_crash_restarts_with_new_pid_until_budget_spent(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("crash", ["sh", "-c", "exit 3"], restart=policy(max_restarts=2)))
        failed = await rec.state("crash", S.FAILED)
        assert failed.reason == "exited with code 3; restart limit reached (2 in 60 s)"
        assert (failed.restarts, failed.exit_code, failed.pid) == (2, 3, None)
        pids = [d["pid"] for k, a, d in rec.events if k == "agent.started" and a == "crash"]
        assert len(set(pids)) == 3
        assert rec.kinds("crash") == [
            "agent.placed",
            *["agent.started", "agent.exited", "agent.restarting"] * 2,
            "agent.started",
            "agent.exited",
            "agent.failed",
        ]
        assert (await rec.event("agent.failed", "crash"))["escalate"] is True


async def test_never_and_on_failure_keep_clean_exit_down(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("never", ["sh", "-c", "exit 4"], restart=policy("never")))
        await sup.place(spec("clean", ["true"], restart=policy("on-failure")))
        never = await rec.state("never", S.EXITED)
        clean = await rec.state("clean", S.EXITED)
        assert (never.exit_code, never.restarts) == (4, 0)
        assert never.reason == "exited with code 4; restart policy never"
        assert (clean.exit_code, clean.restarts) == (0, 0)
        assert "agent.restarting" not in rec.kinds("never") + rec.kinds("clean")


async def test_always_and_unless_stopped_restart_clean_exits(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        for kind in ("always", "unless-stopped"):
            await sup.place(spec(kind, ["true"], restart=policy(kind, max_restarts=2)))
            failed = await rec.state(kind, S.FAILED)
            assert failed.restarts == 2


async def test_signal_death_counts_as_failure(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        first = await sup.place(spec("victim", ["sleep", "100"], restart=policy("on-failure")))
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        exited = await rec.event("agent.exited", "victim")
        assert (exited["signal"], exited["code"]) == ("SIGKILL", None)
        again = await rec.event("agent.started", "victim", count=2)
        assert again["pid"] != first.pid


async def test_backoff_delays_are_applied(tmp_path: Path) -> None:
    backoff = Backoff(initial=0.05, max=0.1, multiplier=2.0, jitter=0.0)
    async with running(tmp_path) as (sup, rec):
        t0 = time.monotonic()
        await sup.place(
            spec("slow", ["false"], restart=policy("always", backoff=backoff, max_restarts=3))
        )
        await rec.state("slow", S.FAILED)
        elapsed = time.monotonic() - t0
        delays = [d["delay"] for k, a, d in rec.events if k == "agent.restarting" and a == "slow"]
        assert delays == [0.05, 0.1, 0.1]
        assert elapsed >= sum(delays)


async def test_crash_to_new_pid_is_fast_with_zero_backoff(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        first = await sup.place(spec("fast", ["sleep", "100"], restart=policy("always")))
        assert first.pid is not None
        t0 = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        await rec.event("agent.started", "fast", count=2)
        assert time.monotonic() - t0 < 0.5  # typically a few ms; loose for a busy CI box
        assert sup.status("fast").state is S.RUNNING


async def test_stop_during_backoff_is_not_undone(tmp_path: Path) -> None:
    backoff = Backoff(initial=30.0, max=30.0, jitter=0.0)
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("wait", ["false"], restart=policy("always", backoff=backoff)))
        await rec.state("wait", S.BACKOFF)
        t0 = time.monotonic()
        stopped = await sup.stop("wait")
        assert stopped.state is S.STOPPED
        assert time.monotonic() - t0 < 1.0
        assert rec.kinds("wait")[-1] == "agent.stopped"


async def test_manual_stop_is_never_undone_by_always(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("keep", ["sleep", "100"], restart=policy("always")))
        stopped = await sup.stop("keep")
        assert (stopped.state, stopped.exit_signal, stopped.pid) == (S.STOPPED, "SIGTERM", None)
        assert stopped.reason == "killed by SIGTERM; stopped by request"
        assert "agent.restarting" not in rec.kinds("keep")


async def test_restart_command_gives_new_process(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        first = await sup.place(spec("r", ["sleep", "100"]))
        second = await sup.restart("r")
        assert second.state is S.RUNNING
        assert second.pid not in (None, first.pid)
        assert first.pid is not None and not alive(first.pid)
        states = [t.to_state for t in second.history]
        assert states[-4:] == [S.STOPPING, S.STOPPED, S.STARTING, S.RUNNING]
        third = await sup.restart("r")  # from running again; restart of a stopped one too
        await sup.stop("r")
        fourth = await sup.restart("r")
        assert len({second.pid, third.pid, fourth.pid}) == 3
