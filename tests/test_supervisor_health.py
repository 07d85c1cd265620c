"""Each health check kind flips an agent to unhealthy and back; unhealthy may restart."""

from __future__ import annotations

from pathlib import Path

from agents.harness import free_port, policy, running, script, spec

from schemas.agent import (
    AgentState,
    ExecCheck,
    HealthCheck,
    HealthSpec,
    HealthVerdict,
    HttpCheck,
    ProcessCheck,
    TcpCheck,
)

H = HealthVerdict


def health(check: HealthCheck, **kw: object) -> HealthSpec:
    kw.setdefault("interval", 0.05)
    kw.setdefault("timeout", 1.0)
    kw.setdefault("failure_threshold", 2)
    return HealthSpec(check=check, **kw)  # type: ignore[arg-type]


def verdicts(rec: object, agent_id: str) -> list[HealthVerdict]:
    out: list[HealthVerdict] = []
    for s in rec.statuses:  # type: ignore[attr-defined]
        if s.agent_id == agent_id and (not out or out[-1] is not s.health):
            out.append(s.health)
    return out


async def wait_health(rec: object, agent_id: str, verdict: HealthVerdict) -> None:
    await rec.wait(lambda: rec.last(agent_id).health is verdict)  # type: ignore[attr-defined]


async def test_tcp_check_flips(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path) as (sup, rec):
        await sup.place(
            spec("tcp", script("tcp_toggle.py", port), health=health(TcpCheck(port=port)))
        )
        await wait_health(rec, "tcp", H.HEALTHY)
        await sup.signal("tcp", "SIGUSR1")  # close the port
        await wait_health(rec, "tcp", H.UNHEALTHY)
        assert "unhealthy" in rec.last("tcp").message
        await sup.signal("tcp", "SIGUSR2")  # open it again
        await wait_health(rec, "tcp", H.HEALTHY)
        assert verdicts(rec, "tcp")[-4:] == [H.HEALTHY, H.DEGRADED, H.UNHEALTHY, H.HEALTHY]
        assert rec.kinds("tcp").count("agent.unhealthy") == 1
        assert sup.status("tcp").restarts == 0  # restart_on_unhealthy is off


async def test_http_check_flips(tmp_path: Path) -> None:
    port = free_port()
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health")
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("web", script("http_toggle.py", port), health=health(check)))
        await wait_health(rec, "web", H.HEALTHY)
        await sup.signal("web", "SIGUSR1")  # answer 500 from now on
        await wait_health(rec, "web", H.UNHEALTHY)
        assert "HTTP status 500" in rec.last("web").message
        await sup.signal("web", "SIGUSR2")
        await wait_health(rec, "web", H.HEALTHY)


async def test_exec_check_flips(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    flag.touch()
    check = ExecCheck(argv=["test", "-f", str(flag)])
    async with running(tmp_path / "state") as (sup, rec):
        await sup.place(spec("ex", ["sleep", "100"], health=health(check, success_threshold=2)))
        await wait_health(rec, "ex", H.HEALTHY)
        flag.unlink()
        await wait_health(rec, "ex", H.UNHEALTHY)
        flag.touch()
        await wait_health(rec, "ex", H.HEALTHY)
        assert (await rec.event("agent.healthy", "ex", count=2))["state"] == "running"


async def test_exec_check_timeout_kills_the_command(tmp_path: Path) -> None:
    check = ExecCheck(argv=["sleep", "100"])
    async with running(tmp_path) as (sup, rec):
        await sup.place(
            spec("hang", ["sleep", "100"], health=health(check, timeout=0.1, failure_threshold=1))
        )
        await wait_health(rec, "hang", H.UNHEALTHY)
        assert "timed out after 0.1 s" in rec.last("hang").message


async def test_process_check_and_restart_on_unhealthy(tmp_path: Path) -> None:
    port = free_port()
    check = health(TcpCheck(port=port), failure_threshold=1, restart_on_unhealthy=True)
    async with running(tmp_path) as (sup, rec):
        await sup.place(spec("proc", ["sleep", "100"], health=health(ProcessCheck())))
        await wait_health(rec, "proc", H.HEALTHY)
        # Nothing listens on the port: unhealthy at once, restarted as "unhealthy".
        first = await sup.place(
            spec("dead", ["sleep", "100"], health=check, restart=policy("never", max_restarts=1))
        )
        exited = await rec.event("agent.exited", "dead")
        assert exited["reason"] == "unhealthy"
        restarting = await rec.event("agent.restarting", "dead")
        assert restarting["restarts"] == 1
        second = await rec.event("agent.started", "dead", count=2)
        assert second["pid"] != first.pid
        failed = await rec.state("dead", AgentState.FAILED)
        assert failed.reason == "unhealthy; restart limit reached (1 in 60 s)"
