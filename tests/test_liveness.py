"""Node liveness: state from heartbeat age and flags, table-driven."""

from __future__ import annotations

import pytest

from fabric.controller.liveness import LivenessConfig, NodeFlags, node_state, transitions
from schemas.node import NodeState

R, S, L, D, C = (
    NodeState.READY,
    NodeState.SUSPECT,
    NodeState.LOST,
    NodeState.DRAINING,
    NodeState.CORDONED,
)
DRAIN = NodeFlags(draining=True)
CORDON = NodeFlags(cordoned=True)
BOTH = NodeFlags(cordoned=True, draining=True)

# (age in seconds or None for never seen, flags, expected) with the default 1.5 s timeout.
CASES = [
    (0.0, NodeFlags(), R),
    (0.5, NodeFlags(), R),
    (1.0, NodeFlags(), R),  # exactly 2/3 of the timeout: not yet suspect
    (1.01, NodeFlags(), S),
    (1.5, NodeFlags(), S),  # exactly the timeout: not yet lost
    (1.51, NodeFlags(), L),
    (60.0, NodeFlags(), L),
    (None, NodeFlags(), L),
    (0.1, DRAIN, D),
    (0.1, CORDON, C),
    (0.1, BOTH, D),  # draining says more than cordoned
    (1.2, DRAIN, S),  # age wins over flags
    (2.0, CORDON, L),
]


@pytest.mark.parametrize(("age", "flags", "expected"), CASES)
def test_node_state(age: float | None, flags: NodeFlags, expected: NodeState) -> None:
    now = 1000.0
    last_seen = None if age is None else now - age
    assert node_state(last_seen, now, flags) is expected


def test_configurable_timeout() -> None:
    config = LivenessConfig(node_timeout=10.0, suspect_fraction=0.5)
    assert config.suspect_after == 5.0
    assert node_state(0.0, 4.9, config=config) is R
    assert node_state(0.0, 5.1, config=config) is S
    assert node_state(0.0, 10.1, config=config) is L


@pytest.mark.parametrize(
    "bad", [{"node_timeout": 0}, {"suspect_fraction": 0}, {"suspect_fraction": 2}]
)
def test_bad_config(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        LivenessConfig(**bad)


def test_transitions() -> None:
    before = {"n1": R, "n2": S, "n3": L}
    after = {"n1": R, "n2": L, "n3": R, "n4": R}
    assert transitions(before, after) == {"n2": (S, L), "n3": (L, R), "n4": (None, R)}
