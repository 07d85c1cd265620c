"""Node liveness from heartbeat age. Pure: the caller passes ``now``.

::

    heartbeat age:  0 ........ suspect_after ........ node_timeout ........
    state:          ready (or draining / cordoned)  suspect              lost

Age wins over the operator's flags: a draining node that stops
heartbeating is lost like any other. ``now`` and ``last_seen`` are readings
of the controller's own monotonic clock, taken when a heartbeat *arrived*,
never the node's ``sent_at``, so clock skew between hosts cannot make a node
look alive or dead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.node import NodeState

__all__ = ["LivenessConfig", "NodeFlags", "node_state", "transitions"]


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    """``node_timeout`` defaults to 3 heartbeats of 0.5 s; suspect after 2 missed."""

    node_timeout: float = 1.5
    suspect_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        if not self.node_timeout > 0:
            raise ValueError("node_timeout must be positive")
        if not 0 < self.suspect_fraction <= 1:
            raise ValueError("suspect_fraction must be in (0, 1]")

    @property
    def suspect_after(self) -> float:
        return self.node_timeout * self.suspect_fraction


@dataclass(frozen=True, slots=True)
class NodeFlags:
    """What the operator (cordon, drain) or the node itself (draining) asked for."""

    cordoned: bool = False
    draining: bool = False


def node_state(
    last_seen: float | None,
    now: float,
    flags: NodeFlags = NodeFlags(),
    config: LivenessConfig = LivenessConfig(),
) -> NodeState:
    """The state of a node last heard from at ``last_seen`` (None: never)."""
    if last_seen is None:
        return NodeState.LOST
    age = now - last_seen
    if age > config.node_timeout:
        return NodeState.LOST
    if age > config.suspect_after:
        return NodeState.SUSPECT
    if flags.draining:
        return NodeState.DRAINING
    if flags.cordoned:
        return NodeState.CORDONED
    return NodeState.READY


def transitions(
    before: Mapping[str, NodeState], after: Mapping[str, NodeState]
) -> dict[str, tuple[NodeState | None, NodeState]]:
    """Nodes whose state changed (a node new in ``after`` changes from None)."""
    return {
        node_id: (before.get(node_id), state)
        for node_id, state in sorted(after.items())
        if before.get(node_id) is not state
    }
