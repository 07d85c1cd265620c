"""`fabric ps`, `nodes`, `version` against a real `fabric up`; JSON checked against the contract."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from test_up import UpProcess, module_fabric, one_line

from fabric.cli.listing_cmd import NodeView
from fabric.cli.output import human_bytes, human_duration
from schemas.agent import AgentStatus
from schemas.discovery import NodeRecord

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=2)


@pytest.fixture(scope="module")
def agents(fabric: UpProcess) -> list[str]:
    fabric.ok("run", "alpha", "--", *SLEEPER)
    fabric.ok("run", "beta", "--", *SLEEPER)
    fabric.ok("stop", "beta")
    return ["alpha", "beta"]


def test_ps_json_is_agent_status_of_the_contract(fabric: UpProcess, agents: list[str]) -> None:
    raw = fabric.ok("ps", "--json")
    listing = msgspec.json.decode(raw, type=list[AgentStatus])
    assert [a.agent_id for a in listing] == ["alpha"]
    assert listing[0].state == "running" and listing[0].pid


def test_ps_all_includes_stopped(fabric: UpProcess, agents: list[str]) -> None:
    listing = msgspec.json.decode(fabric.ok("ps", "-a", "--json"), type=list[AgentStatus])
    assert {a.agent_id: a.state.value for a in listing} == {"alpha": "running", "beta": "stopped"}


def test_ps_text_is_plain_aligned_columns_in_a_pipe(fabric: UpProcess, agents: list[str]) -> None:
    lines = fabric.ok("ps", "-a").splitlines()
    header = lines[0].split()
    assert header == ["AGENT", "NODE", "STATE", "PID", "RESTARTS", "CPU", "MEM", "HEALTH", "UPTIME"]
    assert "\x1b[" not in "".join(lines)  # no colour off a terminal
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alpha"][2] == "running" and rows["beta"][2] == "stopped"
    # Columns line up: each value starts under its header.
    assert lines[1].index(rows[lines[1].split()[0]][2]) == lines[0].index("STATE")


def test_nodes_json_is_node_records_plus_metrics(fabric: UpProcess) -> None:
    raw = fabric.ok("nodes", "--json")
    views = msgspec.json.decode(raw, type=list[NodeView])
    assert [v.info.node_id for v in views] == ["local-1", "local-2"]
    assert all(v.state == "ready" and v.metrics is not None for v in views)
    # Without the added "metrics" field, each item is a plain NodeRecord.
    plain = [{k: v for k, v in item.items() if k != "metrics"} for item in msgspec.json.decode(raw)]
    assert [r.info.node_id for r in msgspec.convert(plain, list[NodeRecord])] == [
        "local-1",
        "local-2",
    ]


def test_nodes_text_columns(fabric: UpProcess) -> None:
    lines = fabric.ok("nodes").splitlines()
    assert lines[0].split() == [
        "NODE",
        "STATE",
        "HOSTNAME",
        "PID",
        "AGENTS",
        "CPU",
        "MEM",
        "HEARTBEAT",
        "AGE",
        "LABELS",
    ]
    assert [line.split()[:2] for line in lines[1:]] == [["local-1", "ready"], ["local-2", "ready"]]


def test_version_names_every_part(fabric: UpProcess) -> None:
    versions = fabric.json("version")
    assert versions["client"] and versions["nats_server"].count(".") == 2
    assert list(versions["controllers"]) == ["controller-1"]
    assert sorted(versions["nodes"]) == ["local-1", "local-2"]
    text = fabric.ok("version")
    assert text.splitlines()[0].startswith("client ")


def _bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}


def test_no_fabric_found_is_one_line_exit_1(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric", "ps"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_bare_env(),
        check=False,
    )
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("fabric: no fabric found: run `fabric up`")


def test_version_without_a_fabric_still_shows_the_client(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric", "version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_bare_env(),
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("client ")
    assert "no fabric found" in one_line(result.stderr)


def test_help_documents_exit_codes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric", "--help"], capture_output=True, text=True, check=True
    )
    assert "exit codes:" in result.stdout
    assert "2  bad usage" in result.stdout


@pytest.mark.parametrize(
    ("value", "text"), [(None, "-"), (0, "0B"), (1536, "1.5KiB"), (3 << 30, "3.0GiB")]
)
def test_human_bytes(value: int | None, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (5.9, "5s"), (192, "3m12s"), (18180, "5h03m"), (2e5, "2d07h")],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text
