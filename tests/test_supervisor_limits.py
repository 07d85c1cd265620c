"""Limits: which mechanism enforces what, rlimits in the child, the memory watchdog."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from agents.harness import policy, running, script, spec, until

from node_agent.cgroup import CgroupTree, favors_dynmods, find_cgroup2_mount, own_cgroup_path
from node_agent.limits import cgroup_settings, memory_exceeded, plan_limits, rlimits_for
from schemas.agent import AgentState, LimitMechanism, Limits

M = LimitMechanism
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_favors_dynmods_reads_the_cgroup2_super_options() -> None:
    assert not favors_dynmods(HYBRID)
    assert not favors_dynmods(UNIFIED)
    assert favors_dynmods(UNIFIED.replace("rw,nsdelegate", "rw,nsdelegate,favordynmods"))
    # The option of a cgroup v1 line or the per-mount options do not count.
    assert not favors_dynmods(HYBRID.replace("rw,memory", "rw,memory,favordynmods"))
    assert not favors_dynmods(UNIFIED.replace("rw,nosuid", "rw,nosuid,favordynmods"))


def test_find_cgroup2_mount() -> None:
    assert find_cgroup2_mount(HYBRID) == Path("/sys/fs/cgroup/unified")
    assert find_cgroup2_mount(UNIFIED) == Path("/sys/fs/cgroup")
    assert find_cgroup2_mount(HYBRID.splitlines()[0]) is None
    spaced = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert find_cgroup2_mount(spaced) == Path("/mnt/cg two")


def test_own_cgroup_path() -> None:
    assert own_cgroup_path("4:memory:/x\n0::/system.slice/fabric-node.service\n") == (
        "/system.slice/fabric-node.service"
    )
    assert own_cgroup_path("0::/\n") == "/"
    assert own_cgroup_path("4:memory:/x\n") is None


def test_detect_refuses_a_plain_directory(tmp_path: Path) -> None:
    assert CgroupTree.detect(tmp_path / "not-a-cgroup") is None


@pytest.mark.parametrize(
    ("controllers", "expected"),
    [
        (
            frozenset(),
            {"memory": M.WATCHDOG, "cpus": M.NONE, "pids": M.NONE, "open_files": M.RLIMIT},
        ),
        (
            frozenset({"memory", "cpu", "pids"}),
            {"memory": M.CGROUP, "cpus": M.CGROUP, "pids": M.CGROUP, "open_files": M.RLIMIT},
        ),
    ],
)
def test_plan_per_limit(controllers: frozenset[str], expected: dict[str, M]) -> None:
    limits = Limits(memory_bytes=64 << 20, cpus=0.5, pids=10, open_files=64)
    plan = plan_limits(limits, controllers)
    assert plan == expected
    settings = cgroup_settings(limits, plan)
    if controllers:
        assert settings == {
            "memory.max": str(64 << 20),
            "cpu.max": "50000 100000",
            "pids.max": "10",
        }
    else:
        assert settings == {}
    assert rlimits_for(limits) == [(resource.RLIMIT_NOFILE, 64, 64)]
    assert memory_exceeded(limits, plan, 65 << 20) is (plan["memory"] is M.WATCHDOG)
    assert not memory_exceeded(limits, plan, 63 << 20)


def test_unset_limits_are_not_reported() -> None:
    assert plan_limits(Limits(), frozenset({"memory"})) == {}
    assert rlimits_for(Limits()) == []


async def test_open_files_rlimit_applies_in_the_child(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        status = await sup.place(
            spec("fds", script("nofile.py"), limits=Limits(open_files=77), restart=policy("never"))
        )
        assert status.limits == {"open_files": M.RLIMIT}
        await rec.state("fds", AgentState.EXITED)
        assert sup.tail_logs("fds", "stdout", 1) == ["nofile 77 77"]


async def test_memory_watchdog_restarts_above_the_ceiling(tmp_path: Path) -> None:
    limits = Limits(memory_bytes=32 << 20)
    async with running(tmp_path, cgroup_base=None) as (sup, rec):
        first = await sup.place(
            spec(
                "hog",
                script("hog.py", 64),
                limits=limits,
                start_seconds=0.5,
                restart=policy("always", max_restarts=5),
            )
        )
        assert first.limits == {"memory": M.WATCHDOG}
        await rec.state("hog", AgentState.RUNNING)  # allocation done long before 0.5 s
        await sup.tick()
        exceeded = await rec.event("agent.limit_exceeded", "hog")
        assert exceeded["rss_bytes"] > 32 << 20
        assert (exceeded["limit"], exceeded["mechanism"]) == ("memory", "watchdog")
        exited = await rec.event("agent.exited", "hog")
        assert exited["reason"] == "memory limit exceeded"
        again = await rec.event("agent.started", "hog", count=2)
        assert again["pid"] != first.pid
        assert sup.status("hog").restarts == 1


async def test_cgroup_tree_when_available(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        if sup.cgroups is None:
            pytest.skip("no writable cgroup v2 subtree on this host")
        status = await sup.place(spec("cg", ["sh", "-c", "sleep 100 & wait"]))
        procs = sup.cgroups.base / "cg" / "cgroup.procs"
        assert str(status.pid) in procs.read_text().split()
        await until(lambda: len(procs.read_text().split()) == 2)  # sh has forked sleep
        await sup.tick()
        metrics = sup.status("cg").metrics
        assert metrics is not None
        assert metrics.children == 1
        await sup.stop("cg")
        await until(lambda: procs.read_text() == "")  # the kill reached sleep too


async def test_stale_empty_agent_cgroups_are_pruned_at_start(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        if sup.cgroups is None:
            pytest.skip("no writable cgroup v2 subtree on this host")
        await sup.place(spec("kept", ["sleep", "100"]))
        stale = sup.cgroups.base / "stale"
        stale.mkdir()
        await sup.shutdown("detach")
    async with running(tmp_path) as (sup, _rec):
        assert sup.cgroups is not None
        assert not stale.exists()
        assert (sup.cgroups.base / "kept").is_dir()
        assert sup.status("kept").reason == "re-adopted"
