"""`fabric events` against a real `fabric up`: replay from the EVENTS stream, filter, follow."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from test_up import PipeLines, UpProcess, interrupt, module_fabric

from fabric.cli import UsageError
from fabric.cli.events_cmd import parse_since
from schemas.event import CloudEvent

FABRIC = [sys.executable, "-m", "fabric"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=1)


@pytest.fixture(scope="module")
def worker(fabric: UpProcess) -> str:
    fabric.ok("run", "worker", "--", *SLEEPER)
    return "worker"


def events(fabric: UpProcess, *args: str) -> list[CloudEvent]:
    out = fabric.ok("events", "--json", *args)
    return [msgspec.json.decode(line, type=CloudEvent) for line in out.splitlines()]


def test_replay_shows_the_agent_events(fabric: UpProcess, worker: str) -> None:
    replay = events(fabric, "--since", "5m")
    kinds = [(e.kind, e.subject) for e in replay]
    for expected in ("deployment.created", "agent.placed", "agent.started"):
        assert (expected, worker) in kinds
    assert [e.time for e in replay] == sorted(e.time for e in replay)
    created = next(e for e in replay if e.kind == "deployment.created")
    assert created.actor == "admin"  # the token's subject: the operator cert's CN


def test_type_filter_is_a_glob_over_the_kind(fabric: UpProcess, worker: str) -> None:
    kinds = {e.kind for e in events(fabric, "--since", "5m", "--type", "agent.*")}
    assert kinds and all(k.startswith("agent.") for k in kinds)
    assert {e.kind for e in events(fabric, "--since", "5m", "--type", "node.started")} == {
        "node.started"
    }


def test_since_in_the_future_replays_nothing(fabric: UpProcess, worker: str) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert events(fabric, "--since", later) == []


def test_text_lines_name_kind_and_subject(fabric: UpProcess, worker: str) -> None:
    lines = fabric.ok("events", "--since", "5m", "--type", "agent.started").splitlines()
    assert lines and all("agent.started" in line and worker in line for line in lines)


def test_follow_prints_new_events_then_ctrl_c_ends_it(fabric: UpProcess, worker: str) -> None:
    follower = subprocess.Popen(
        [*FABRIC, "events", "-f", "--json", "--since", "5m", "--type", "agent.*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=fabric.env(),
    )
    try:
        assert follower.stdout is not None
        lines = PipeLines(follower.stdout.fileno())
        # The replayed start proves the follower is reading before we act.
        next_event(lines, "agent.started", worker)
        fabric.ok("stop", worker)
        next_event(lines, "agent.stopped", worker)
    finally:
        _, err = interrupt(follower)
    assert follower.returncode == 130
    assert b"Traceback" not in err


def next_event(lines: PipeLines, kind: str, subject: str, timeout: float = 15.0) -> CloudEvent:
    deadline = time.monotonic() + timeout
    while True:
        event = msgspec.json.decode(lines.next_line(deadline), type=CloudEvent)
        if (event.kind, event.subject) == (kind, subject):
            return event


@pytest.mark.parametrize(
    ("text", "delta"),
    [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("0.5m", 30)],
)
def test_parse_since_durations(text: str, delta: float) -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since(text, now) == now - timedelta(seconds=delta)


def test_parse_since_times_and_garbage() -> None:
    assert parse_since("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(UsageError, match="--since must be a duration like 5m"):
        parse_since("yesterday")
