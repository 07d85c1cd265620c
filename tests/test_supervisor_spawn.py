"""Spawning: argv/env/cwd/session, start_seconds, placement idempotence, errors."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest
from agents.harness import policy, running, script, spec

from node_agent import supervisor as supervisor_module
from node_agent.supervisor import SupervisorConfig
from schemas.agent import AgentState as S
from schemas.errors import ContractError, ErrorCode


def test_all_exports_exist() -> None:
    for name in supervisor_module.__all__:
        assert hasattr(supervisor_module, name)


async def test_start_seconds_zero_is_running_when_place_returns(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        status = await sup.place(spec("a", ["sleep", "100"]))
        assert status.state is S.RUNNING
        assert status.pid is not None
        assert psutil.Process(status.pid).status() != psutil.STATUS_ZOMBIE
        # Own session and process group, stdin closed (/dev/null).
        assert os.getsid(status.pid) == status.pid
        assert os.getpgid(status.pid) == status.pid
        assert os.readlink(f"/proc/{status.pid}/fd/0") == "/dev/null"
        assert [t.to_state for t in status.history] == [S.PENDING, S.STARTING, S.RUNNING]
        assert rec.kinds("a")[:2] == ["agent.placed", "agent.started"]


async def test_argv_env_cwd_and_logs(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"extra_env": lambda s: {"FROM_NODE": f"node-{s.name}"}}
    async with running(tmp_path / "state", **cfg) as (sup, rec):
        shell = 'echo "$PWD|$FROM_SPEC|$FROM_NODE|$FABRIC_AGENT_ID|${HOME:-none}"'
        await sup.place(
            spec(
                "env",
                [shell],
                shell=True,
                cwd=str(work),
                env={"FROM_SPEC": "spec"},
                restart=policy("never"),
            )
        )
        await rec.state("env", S.EXITED)
        assert sup.tail_logs("env", "stdout", 5) == [
            f"{work}|spec|node-env|env|{os.environ['HOME']}"
        ]
        await sup.place(
            spec(
                "clean",
                ["/bin/sh", "-c", 'echo "${HOME:-none}" >&2'],
                clean_env=True,
                restart=policy("never"),
            )
        )
        await rec.state("clean", S.EXITED)
        assert sup.tail_logs("clean", "stderr", 5) == ["none"]
        assert sup.status("clean").exit_code == 0


async def test_start_seconds_promotes_to_running(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        t0 = time.monotonic()
        status = await sup.place(spec("slow", ["sleep", "100"], start_seconds=0.2))
        assert status.state is S.STARTING
        up = await rec.state("slow", S.RUNNING)
        assert time.monotonic() - t0 >= 0.2
        assert up.reason == "alive after 0.2 s"


async def test_death_within_start_seconds_is_a_failed_start(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(
            spec(
                "flaky",
                ["sh", "-c", "sleep 0.2; exit 1"],
                start_seconds=1.0,
                restart=policy("on-failure", max_restarts=1),
            )
        )
        first = await rec.event("agent.exited", "flaky")
        assert first["failed_start"] is True
        assert first["code"] == 1
        failed = await rec.state("flaky", S.FAILED)
        assert failed.reason.startswith("failed start: exited with code 1; restart limit reached")
        assert failed.restarts == 1
        assert S.RUNNING not in rec.states("flaky")
        assert (await rec.event("agent.failed", "flaky"))["escalate"] is True


async def test_place_is_idempotent_and_replaces_on_change(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        first = await sup.place(spec("a", ["sleep", "100"]), epoch=1)
        again = await sup.place(spec("a", ["sleep", "100"]), epoch=1)
        assert again.pid == first.pid
        assert rec.kinds("a").count("agent.placed") == 1
        changed = await sup.place(spec("a", ["sleep", "200"]), epoch=1)
        assert changed.state is S.RUNNING
        assert changed.pid != first.pid
        assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == "zombie"
        newer = await sup.place(spec("a", ["sleep", "200"]), epoch=2)
        assert (newer.epoch, newer.pid != changed.pid) == (2, True)
        with pytest.raises(ContractError) as err:
            await sup.place(spec("a", ["sleep", "200"]), epoch=1)
        assert err.value.code is ErrorCode.STALE_EPOCH


async def test_cannot_spawn_is_failed(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        status = await sup.place(spec("nope", ["/nonexistent/binary"]))
        assert status.state is S.FAILED
        assert status.reason.startswith("cannot spawn:")
        assert (await rec.event("agent.failed", "nope"))["escalate"] is False
        bad_cwd = await sup.place(spec("cwd", ["true"], cwd=str(tmp_path / "missing")))
        assert bad_cwd.state is S.FAILED


async def test_errors_carry_codes(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        with pytest.raises(ContractError) as missing:
            sup.status("ghost")
        assert missing.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ContractError) as missing_stop:
            await sup.stop("ghost")
        assert missing_stop.value.code is ErrorCode.NOT_FOUND
        await sup.place(spec("a", ["sleep", "100"]))
        await sup.stop("a")
        with pytest.raises(ContractError, match="cannot pause agent a: it is stopped") as bad:
            await sup.pause("a")
        assert bad.value.code is ErrorCode.INVALID_STATE
        with pytest.raises(ContractError) as bad_signal:
            await sup.signal("a", "SIGTERM")
        assert bad_signal.value.code is ErrorCode.INVALID_STATE
        with pytest.raises(ContractError) as not_allowed:
            await sup.signal("a", "SIGSEGV")  # type: ignore[arg-type]
        assert not_allowed.value.code is ErrorCode.INVALID_PAYLOAD
        started = await sup.start("a")
        assert started.state is S.RUNNING
        with pytest.raises(ContractError) as twice:
            await sup.start("a")
        assert twice.value.code is ErrorCode.INVALID_STATE


async def test_status_fields_and_node_metrics(tmp_path: Path) -> None:
    async with running(tmp_path, node_id="node-7") as (sup, _rec):
        await sup.place(spec("a", ["sleep", "100"]), epoch=3)
        status = sup.status("a")
        assert (status.node_id, status.epoch, status.restarts) == ("node-7", 3, 0)
        assert [s.agent_id for s in sup.statuses()] == ["a"]
        assert sup.spec("a").argv == ["sleep", "100"]
        node = sup.node_metrics()
        assert node.memory_total_bytes > node.memory_used_bytes > 0
        assert node.disk_total_bytes >= node.disk_free_bytes > 0


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = SupervisorConfig(node_id="n1", state_dir=tmp_path)
    with pytest.raises(AttributeError):
        cfg.node_id = "n2"  # type: ignore[misc]
    assert (cfg.metrics_interval, cfg.cgroup_base) == (5.0, "auto")


async def test_python_child_runs(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("py", script("nofile.py"), restart=policy("never")))
        done = await rec.state("py", S.EXITED)
        assert done.exit_code == 0
        assert sup.tail_logs("py", "stdout", 1)[0].startswith("nofile ")


async def test_place_after_shutdown_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        await sup.shutdown("drain")
        with pytest.raises(ContractError) as err:
            await sup.place(spec("late", ["sleep", "100"]))
        assert err.value.code is ErrorCode.UNAVAILABLE
        assert sup.statuses() == []


async def test_commands_racing_a_remove_get_not_found(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        await sup.place(spec("r", ["sleep", "100"]))
        removing = asyncio.ensure_future(sup.remove("r"))
        await asyncio.sleep(0)  # wait-ok: let remove take the agent's lock first
        with pytest.raises(ContractError) as err:
            await sup.pause("r")
        assert err.value.code is ErrorCode.NOT_FOUND
        assert (await removing).state is S.STOPPED


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
async def test_user_and_group_when_root(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    async with running(tmp_path) as (sup, rec):
        await sup.place(
            spec(
                "who", ["sh", "-c", "id -u; id -g"], user="nobody", cwd="/", restart=policy("never")
            )
        )
        await rec.state("who", S.EXITED)
        assert sup.tail_logs("who", "stdout", 2) == [str(nobody.pw_uid), str(nobody.pw_gid)]
