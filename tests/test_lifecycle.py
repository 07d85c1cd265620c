"""The agent state machine: allowed moves, refusals, history bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from node_agent import lifecycle
from node_agent.lifecycle import ALLOWED, HISTORY_SIZE, AgentLifecycle
from schemas.agent import AgentState as S
from schemas.errors import ContractError, ErrorCode


def test_all_exports_exist() -> None:
    for name in lifecycle.__all__:
        assert hasattr(lifecycle, name)


def test_every_state_has_a_row() -> None:
    assert set(ALLOWED) == set(S)


def test_normal_life() -> None:
    lc = AgentLifecycle()
    assert lc.state is S.PENDING
    for to in (S.STARTING, S.RUNNING, S.PAUSED, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING):
        lc.transition(to, f"to {to}")
    assert lc.state is S.STARTING
    assert [t.to_state for t in lc.history][:3] == [S.PENDING, S.STARTING, S.RUNNING]
    assert lc.history[0].from_state is None
    assert lc.history[-1].from_state is S.STOPPED


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), S.PAUSED),
        ((S.STARTING,), S.PAUSED),
        ((S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED), S.RUNNING),
        ((S.STARTING, S.EXITED), S.PAUSED),
        ((S.STARTING, S.BACKOFF), S.RUNNING),
    ],
)
def test_forbidden_moves_raise_invalid_state(path: tuple[S, ...], bad: S) -> None:
    lc = AgentLifecycle()
    for to in path:
        lc.transition(to, "ok")
    before = lc.state
    with pytest.raises(ContractError, match="cannot go from") as err:
        lc.transition(bad, "nope")
    assert err.value.code is ErrorCode.INVALID_STATE
    assert lc.state is before
    assert not lc.can(bad)


def test_exit_recorded_and_cleared_on_new_start() -> None:
    lc = AgentLifecycle()
    lc.transition(S.STARTING, "spawn")
    lc.record_exit(3, None)
    lc.transition(S.EXITED, "exited with code 3")
    assert (lc.exit_code, lc.exit_signal) == (3, None)
    lc.transition(S.STARTING, "start")
    assert (lc.exit_code, lc.exit_signal) == (None, None)


def test_history_is_bounded_and_timestamped() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ticks = iter(t0 + timedelta(seconds=i) for i in range(1000))
    lc = AgentLifecycle(clock=lambda: next(ticks))
    lc.transition(S.STARTING, "spawn")
    for _ in range(100):
        lc.transition(S.RUNNING, "up")
        lc.transition(S.PAUSED, "pause")
    assert len(lc.history) == HISTORY_SIZE
    stamps = [t.at for t in lc.history]
    assert stamps == sorted(stamps)
    assert lc.since == stamps[-1]


def test_long_reason_is_cut_to_wire_size() -> None:
    lc = AgentLifecycle()
    lc.transition(S.FAILED, "x" * 1000)
    assert len(lc.reason) == 256
