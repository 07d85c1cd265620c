"""Stopping: grace then SIGKILL, parallel stops, escaped descendants, pause, remove."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from agents.harness import alive, fifo_line, running, script, spec, until

from schemas.agent import AgentState as S
from schemas.errors import ContractError, ErrorCode

IGNORE_TERM = ["sh", "-c", "trap '' TERM; exec sleep 1000"]
CGROUP_MODES = [pytest.param("auto", id="cgroup-auto"), pytest.param(None, id="no-cgroup")]


async def test_term_ignoring_agents_stop_in_parallel(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        ids = [f"stubborn-{i}" for i in range(10)]
        for agent_id in ids:
            # start_seconds gives sh the time to install its trap before we may stop it.
            await sup.place(spec(agent_id, IGNORE_TERM, start_seconds=0.2, stop_timeout=1.0))
        for agent_id in ids:
            await rec.state(agent_id, S.RUNNING)
        t0 = time.monotonic()
        statuses = await sup.stop_many(ids)
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 2.0, elapsed  # one grace period, not ten
        assert {s.state for s in statuses} == {S.STOPPED}
        assert {s.exit_signal for s in statuses} == {"SIGKILL"}


async def test_stop_timeout_override_and_stop_signal(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("stubborn", IGNORE_TERM, start_seconds=0.2, stop_timeout=30))
        await rec.state("stubborn", S.RUNNING)
        t0 = time.monotonic()
        stopped = await sup.stop("stubborn", timeout=0.2)
        assert time.monotonic() - t0 < 2.0
        assert stopped.exit_signal == "SIGKILL"
        await sup.place(spec("int", ["sleep", "100"], stop_signal="SIGINT"))
        assert (await sup.stop("int")).exit_signal == "SIGINT"


@pytest.mark.parametrize("cgroup_base", CGROUP_MODES)
async def test_escaped_grandchild_is_killed_and_reaped(tmp_path: Path, cgroup_base: Any) -> None:
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    async with running(tmp_path / "state", cgroup_base=cgroup_base) as (sup, _rec):
        await sup.place(spec("daemon", script("double_fork.py", fifo), stop_timeout=0.5))
        main_pid, grandchild = map(int, (await fifo_line(fifo)).split())
        proc = psutil.Process(grandchild)
        assert proc.ppid() == os.getpid()  # re-parented to us, the subreaper
        assert os.getpgid(grandchild) != main_pid  # escaped the agent's group
        assert sup.subreaper
        stopped = await sup.stop("daemon")
        assert stopped.state is S.STOPPED
        # SIGKILLed and reaped by our reaper: no zombie left behind.
        await until(lambda: not psutil.pid_exists(grandchild), 5.0)
        assert not alive(main_pid)
        assert sup.orphans_reaped >= 1


@pytest.mark.parametrize("cgroup_base", CGROUP_MODES)
async def test_pause_and_resume(tmp_path: Path, cgroup_base: Any) -> None:
    async with running(tmp_path, cgroup_base=cgroup_base) as (sup, rec):
        status = await sup.place(spec("p", ["sleep", "100"]))
        assert status.pid is not None
        paused = await sup.pause("p")
        assert paused.state is S.PAUSED
        proc = psutil.Process(status.pid)
        cgroup = sup.cgroups.base / "p" if sup.cgroups and cgroup_base else None
        if cgroup is not None:
            await until(lambda: "frozen 1" in (cgroup / "cgroup.events").read_text())
        else:  # signal delivery is asynchronous
            await until(lambda: proc.status() == psutil.STATUS_STOPPED)
        with pytest.raises(ContractError) as twice:
            await sup.pause("p")
        assert twice.value.code is ErrorCode.INVALID_STATE
        resumed = await sup.resume("p")
        assert resumed.state is S.RUNNING
        if cgroup is not None:
            await until(lambda: "frozen 0" in (cgroup / "cgroup.events").read_text())
        await until(lambda: proc.status() != psutil.STATUS_STOPPED)
        assert [k for k in rec.kinds("p") if k.endswith("ed")][-2:] == [
            "agent.paused",
            "agent.resumed",
        ]
        # A paused agent still stops (it is thawed to handle its stop signal).
        await sup.pause("p")
        stopped = await sup.stop("p")
        assert (stopped.state, stopped.exit_signal) == (S.STOPPED, "SIGTERM")


async def test_remove_stops_and_forgets(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        status = await sup.place(spec("gone", ["sleep", "100"]))
        assert status.pid is not None
        cgroup = sup.cgroups.base / "gone" if sup.cgroups else None
        final = await sup.remove("gone")
        assert final.state is S.STOPPED
        assert not alive(status.pid)
        assert not (tmp_path / "agents" / "gone.json").exists()
        assert not (tmp_path / "logs" / "gone").exists()
        assert cgroup is None or not cgroup.exists()
        with pytest.raises(ContractError) as err:
            sup.status("gone")
        assert err.value.code is ErrorCode.NOT_FOUND
        assert rec.kinds("gone")[-1] == "agent.removed"


async def test_signal_reaches_the_group(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("sig", ["sleep", "100"], start_seconds=0))
        await sup.signal("sig", "SIGUSR1")  # sleep dies of SIGUSR1's default action
        exited = await rec.event("agent.exited", "sig")
        assert exited["signal"] == "SIGUSR1"
