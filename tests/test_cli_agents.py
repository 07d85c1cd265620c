"""Agent verbs against a real `fabric up` (two nodes): run, stop/start/..., rm, inspect, logs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from test_up import PipeLines, UpProcess, alive, interrupt, module_fabric, one_line, until

from fabric.cli.agents_cmd import parse_size
from fabric.cli.logs_cmd import new_lines

SLEEPER = [sys.executable, "-c", "import time; print('up'); time.sleep(600)"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=2)


@pytest.fixture(scope="module")
def web(fabric: UpProcess) -> str:
    out = fabric.ok("run", "web", "--", sys.executable, "-m", "http.server", "0")
    assert out.splitlines()[0] == "created web"
    assert out.splitlines()[1].startswith("web running on local-")
    return "web"


def state_of(fabric: UpProcess, agent_id: str) -> str | None:
    agent = fabric.agents().get(agent_id)
    return None if agent is None else str(agent["state"])


def test_run_waits_until_running_and_ps_shows_the_pid(fabric: UpProcess, web: str) -> None:
    agent = fabric.agents()[web]
    assert agent["state"] == "running"
    assert agent["node_id"] in ("local-1", "local-2")
    assert alive(agent["pid"])
    assert [a["agent_id"] for a in fabric.json("ps")] == [web]


def test_run_again_is_unchanged(fabric: UpProcess, web: str) -> None:
    out = fabric.ok("run", web, "--", sys.executable, "-m", "http.server", "0")
    assert out.splitlines()[0] == f"unchanged: {web}"


def test_logs_tail_returns_lines(fabric: UpProcess, web: str) -> None:
    def serving() -> str | None:
        out = fabric.ok("logs", "-n", "5", web)
        return out if "Serving HTTP" in out else None

    assert len(until("the server's first line", serving).splitlines()) <= 5


def test_logs_follow_prints_new_lines_of_both_streams(fabric: UpProcess) -> None:
    ticker = "import itertools, sys, time\nfor i in itertools.count():\n"
    ticker += "    print('tick', i); print('tock', i, file=sys.stderr); time.sleep(0.2)"
    fabric.ok("run", "ticker", "--", sys.executable, "-c", ticker)
    follower = subprocess.Popen(
        [sys.executable, "-m", "fabric", "logs", "-f", "-n", "1", "ticker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=fabric.env(),
    )
    try:
        assert follower.stdout is not None and follower.stderr is not None
        out, err = PipeLines(follower.stdout.fileno()), PipeLines(follower.stderr.fileno())
        deadline = time.monotonic() + 15
        first = int(out.next_line(deadline).split()[1])
        # Consecutive new lines, past the tail: it follows, nothing lost or repeated.
        assert [out.next_line(deadline) for _ in range(5)] == [
            f"tick {n}".encode() for n in range(first + 1, first + 6)
        ]
        assert err.next_line(deadline).startswith(b"tock ")
    finally:
        interrupt(follower)
    assert follower.returncode == 130
    fabric.ok("rm", "ticker")


def test_stop_stays_stopped_then_start(fabric: UpProcess, web: str) -> None:
    pid = fabric.agents()[web]["pid"]
    assert fabric.ok("stop", web).strip() == f"{web} stopped"
    assert not alive(pid)
    assert web not in [a["agent_id"] for a in fabric.json("ps")]
    # The controller must not undo a manual stop: watch it over several
    # reconcile passes and heartbeats (0.25 s and 1 s under `fabric up`).
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert state_of(fabric, web) == "stopped"
    assert fabric.ok("start", web).strip() == f"{web} running"  # start waits out "starting"
    assert state_of(fabric, web) == "running"


def test_restart_pause_resume_kill(fabric: UpProcess, web: str) -> None:
    before = fabric.agents()[web]
    assert fabric.ok("restart", web).strip() == f"{web} running"
    assert fabric.agents()[web]["pid"] != before["pid"]
    assert fabric.ok("pause", web).strip() == f"{web} paused"
    assert state_of(fabric, web) == "paused"
    assert fabric.ok("resume", web).strip() == f"{web} running"
    restarts = fabric.agents()[web]["restarts"]
    fabric.ok("kill", web)
    # on-failure: a SIGKILL is a failure, so the node restarts it.
    until(
        "a restart after kill",
        lambda: (a := fabric.agents()[web])["restarts"] > restarts and a["state"] == "running",
    )


def test_inspect_shows_spec_placement_and_history(fabric: UpProcess, web: str) -> None:
    data = fabric.json("inspect", web)
    spec = data["deployment"]["deployment"]["spec"]
    assert spec["argv"][1:] == ["-m", "http.server", "0"]
    assert spec["env"]["PYTHONUNBUFFERED"] == "1"
    [replica] = data["deployment"]["replicas"]
    [agent] = data["agents"]
    assert agent["node_id"] == replica["node_id"]
    assert agent["history"][0]["to_state"] == "pending"
    text = fabric.ok("inspect", web)
    assert "Command:" in text and "History:" in text and f"Agent {web} on" in text


def test_replicas_spread_and_verbs_act_on_each(fabric: UpProcess) -> None:
    out = fabric.ok("run", "svc", "--replicas", "2", "--label", "tier=test", "--", *SLEEPER)
    running = sorted(line.split(" running on ")[0] for line in out.splitlines()[1:])
    assert running == ["svc-0", "svc-1"]
    agents = fabric.agents()
    assert {agents["svc-0"]["node_id"], agents["svc-1"]["node_id"]} == {"local-1", "local-2"}
    assert sorted(fabric.ok("stop", "svc").splitlines()) == ["svc-0 stopped", "svc-1 stopped"]
    pids = [agents["svc-0"]["pid"], agents["svc-1"]["pid"]]
    assert fabric.ok("rm", "svc").strip() == "removed svc"
    until("svc gone", lambda: not {"svc-0", "svc-1"} & fabric.agents().keys())
    assert not [p for p in pids if alive(p)]


def test_failing_command_reports_its_exit_and_last_log_lines(fabric: UpProcess) -> None:
    crash = "import sys; print('boom on stderr', file=sys.stderr); sys.exit(3)"
    result = fabric.cli("run", "crash", "--restart", "never", "--", sys.executable, "-c", crash)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "  boom on stderr" in lines
    assert lines[-1] == "fabric: crash exited with code 3"
    fabric.ok("rm", "crash")


@pytest.mark.parametrize(
    "args",
    [("stop", "nosuch"), ("logs", "nosuch"), ("inspect", "nosuch"), ("rm", "nosuch")],
)
def test_wrong_name_is_one_line_exit_1(fabric: UpProcess, args: tuple[str, ...]) -> None:
    result = fabric.cli(*args)
    assert result.returncode == 1
    assert "nosuch" in one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("run", "x", "--replicas", "many", "--", "true"), "--replicas must be a number"),
        (("run", "x"), "no command"),
        (("run", "Bad_Name!", "--", "true"), "bad name"),
        (("run", "x", "--restart", "sometimes", "--", "true"), "--restart must be one of"),
        (("run", "x", "--memory", "lots", "--", "true"), "--memory must be a size"),
        (("stop", "--bogus", "web"), "unrecognized arguments: --bogus"),
        (("kill", "-s", "SIGNOPE", "web"), "signal 'SIGNOPE' is not allowed"),
    ],
)
def test_bad_usage_is_one_line_exit_2(fabric: UpProcess, args: tuple[str, ...], match: str) -> None:
    result = fabric.cli(*args)
    assert result.returncode == 2
    assert match in one_line(result.stderr)


def test_rm_removes_the_agent_and_its_process(fabric: UpProcess, web: str) -> None:
    pid = fabric.agents()[web]["pid"]
    assert fabric.ok("rm", web).strip() == f"removed {web}"
    assert web not in fabric.agents()
    until("the process to exit", lambda: not alive(pid))


@pytest.mark.parametrize(
    ("text", "size"), [("512m", 512 << 20), ("2G", 2 << 30), ("1.5gib", 3 << 29), ("4096", 4096)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("previous", "current", "new"),
    [
        ([], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b", "c"], ["c"]),
        (["a", "b", "c"], ["b", "c", "d"], ["d"]),  # the window slid by one
        (["a", "b"], ["a", "b"], []),
        (["x", "t", "t"], ["x", "t", "t", "t"], ["t"]),  # a repeated line still counts
        (["a", "b"], ["y", "z"], ["y", "z"]),  # rotated: print all
    ],
)
def test_new_lines(previous: list[str], current: list[str], new: list[str]) -> None:
    assert new_lines(previous, current) == new
