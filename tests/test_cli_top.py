"""`fabric top` against a real `fabric up`: off a terminal it prints one snapshot."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
from test_up import UpProcess, module_fabric, one_line, until

from fabric.live import FleetView
from schemas.agent import AgentState, AgentStatus
from schemas.common import utc_now
from schemas.node import AgentSummary, NodeHeartbeat


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=1)


def test_top_once_lists_the_node_the_agent_and_events(fabric: UpProcess) -> None:
    fabric.ok("run", "topweb", "--", sys.executable, "-m", "http.server", "0")
    out = fabric.ok("top", "--once")
    lines = out.splitlines()
    assert lines[0].startswith("fabric top")
    assert "1 agents (1 running)" in lines[0]
    node = next(line.split() for line in lines if line.split()[:1] == ["local-1"])
    assert node[1] == "ready" and node[2].endswith("%")  # a heartbeat was waited for
    agent = next(line.split() for line in lines if line.split()[:1] == ["topweb"])
    assert agent[1:4] == ["local-1", "running", "unknown"]
    assert "deployment.created" in out and "\x1b[" not in out


def test_top_off_a_terminal_prints_one_snapshot_and_json(fabric: UpProcess) -> None:
    fabric.ok("run", "topweb", "--", sys.executable, "-m", "http.server", "0")
    assert "topweb" in fabric.ok("top")  # no --once: a pipe is not a terminal
    snap = json.loads(fabric.ok("top", "--once", "--json"))
    assert [n["node_id"] for n in snap["nodes"]] == ["local-1"]
    assert snap["nodes"][0]["metrics"]["memory_total_bytes"] > 0
    agents = {a["agent_id"]: a for a in snap["agents"]}
    assert agents["topweb"]["state"] == "running"
    assert any(e["type"] == "io.agent-fabric.deployment.created" for e in snap["events"])
    fabric.ok("stop", "topweb")
    until(
        "topweb stopped in top",
        lambda: json.loads(fabric.ok("top", "--once", "--json"))["agents"][0]["state"] == "stopped",
    )


def test_top_shows_the_task_backlog_per_type(fabric: UpProcess) -> None:
    # Submitted by the CLI with its own token: `fabric up` requires one, so a
    # refused task would leave no backlog to see.
    fabric.ok("task", "submit", "topidle", "--id", "top-idle-1", "--data", '{"n": 1}')

    def waiting() -> dict[str, object] | None:
        snap = json.loads(fabric.ok("top", "--once", "--json"))
        found = {t["type"]: t for t in snap["tasks"]}.get("topidle")
        return found if found and found["waiting"] == 1 else None

    backlog = until("the waiting task in top's JSON", waiting)
    assert (backlog["backlog"], backlog["running"]) == (1, 0)
    assert backlog["reasons"] == {"no running agent serves 'topidle'": 1}
    lines = fabric.ok("top", "--once").splitlines()
    at = lines.index("TASKS")
    assert lines[at + 1].split() == ["TYPE", "BACKLOG", "RUNNING", "WAITING", "WHY"]
    row = next(line for line in lines[at:] if line.split()[:1] == ["topidle"])
    assert row.split()[1:4] == ["1", "0", "1"]
    assert row.endswith("no running agent serves 'topidle'")
    record = json.loads(fabric.ok("task", "get", "top-idle-1", "--json"))
    assert (record["state"], record["submitted_by"]) == ("queued", "admin")


def test_top_with_no_fabric_is_one_line_exit_1(
    fabric: UpProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    result = fabric.cli("top", "--once", "--state-dir", str(tmp_path_factory.mktemp("none")))
    assert result.returncode == 1
    assert "no fabric found" in one_line(result.stderr)


# --- the view alone ------------------------------------------------------------------


def _status(agent_id: str, node: str, state: AgentState, epoch: int = 1) -> AgentStatus:
    return AgentStatus(agent_id=agent_id, node_id=node, state=state, since=utc_now(), epoch=epoch)


def test_view_keeps_the_newest_copy_and_drops_what_a_node_no_longer_runs() -> None:
    view = FleetView()
    changes: list[str] = []
    view.listeners.append(lambda c: changes.append(c.kind))
    view.apply_status(_status("a", "n2", AgentState.RUNNING, epoch=2))
    assert not view.apply_status(_status("a", "n1", AgentState.STOPPED, epoch=1))
    assert view.agents["a"].node_id == "n2"
    view.apply_heartbeat(
        NodeHeartbeat(
            node_id="n2",
            seq=1,
            sent_at=utc_now(),
            pid=1,
            agents=[AgentSummary("b", AgentState.RUNNING)],
        )
    )
    # "a" was heard of just now: kept for a moment; "b" comes from the heartbeat.
    assert sorted(view.agents) == ["a", "b"]
    assert view.nodes["n2"].state == "ready"
    assert changes == ["agent", "node", "agent"]
