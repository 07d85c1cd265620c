"""Placement: which node should run one replica. Pure: no NATS, no clock.

Given a snapshot of the nodes and what is already allocated on them, a
replica goes through two steps:

1. **Filter**: the node is ``ready`` (not suspect, lost, draining or
   cordoned), has every required label and capability, has room for the
   spec's ``limits.cpus`` and ``limits.memory_bytes`` next to what is already
   allocated there, holds fewer than ``max_per_node`` replicas of this
   deployment, and is not excluded by the caller.
2. **Rank**: fewest replicas of this deployment first (so replicas land on
   different nodes whenever possible), then ``spread`` (fewest agents in all)
   or ``pack`` (most agents in all), then the node id. The id makes every
   tie break the same way, so a snapshot always yields the same answer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.api import Deployment
from schemas.node import NodeState

__all__ = [
    "Allocation",
    "Decision",
    "NodeSnapshot",
    "choose_node",
    "demand",
    "place_replicas",
]

# Float sums of cpus drift (0.1 + 0.2); a node exactly full must still fit.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What placement needs to know about one node."""

    node_id: str
    state: NodeState = NodeState.READY
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    cpus: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Allocation:
    """One replica already assigned to a node, and what it reserves there."""

    agent_id: str
    deployment: str
    cpus: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen node, or None with the reason every node was refused."""

    node_id: str | None
    reason: str = ""


def demand(deployment: Deployment) -> tuple[float, int]:
    """The cpus and memory one replica reserves; an unset limit reserves nothing."""
    limits = deployment.spec.limits
    return (limits.cpus or 0.0, limits.memory_bytes or 0)


def _refusal(
    node: NodeSnapshot,
    deployment: Deployment,
    allocated: Sequence[Allocation],
    excluded: Collection[str],
) -> str | None:
    """Why ``node`` cannot take one more replica, or None when it can."""
    if node.node_id in excluded:
        return "excluded"
    if node.state is not NodeState.READY:
        return f"node {node.state.value}"
    wanted = deployment.constraints
    for key, value in wanted.labels.items():
        if node.labels.get(key) != value:
            return f"label {key}={value} missing"
    for capability in wanted.capabilities:
        if capability not in node.capabilities:
            return f"capability {capability} missing"
    if wanted.max_per_node is not None:
        mine = sum(1 for a in allocated if a.deployment == deployment.name)
        if mine >= wanted.max_per_node:
            return "max_per_node reached"
    cpus, memory = demand(deployment)
    used_cpus = sum(a.cpus for a in allocated)
    used_memory = sum(a.memory_bytes for a in allocated)
    if cpus > 0 and used_cpus + cpus > node.cpus + _EPSILON:
        return "not enough cpus"
    if memory > 0 and used_memory + memory > node.memory_bytes:
        return "not enough memory"
    return None


def choose_node(
    deployment: Deployment,
    nodes: Iterable[NodeSnapshot],
    allocations: Mapping[str, Sequence[Allocation]],
    *,
    exclude: Collection[str] = (),
) -> Decision:
    """The best node for one more replica of ``deployment``.

    ``allocations`` maps node id to what is assigned there already (any
    deployment); ``exclude`` lists nodes this replica must avoid (e.g. the
    node it just failed on).
    """
    candidates: list[tuple[int, int, str]] = []
    refusals: dict[str, int] = {}
    for node in nodes:
        allocated = allocations.get(node.node_id, ())
        why = _refusal(node, deployment, allocated, exclude)
        if why is not None:
            refusals[why] = refusals.get(why, 0) + 1
            continue
        mine = sum(1 for a in allocated if a.deployment == deployment.name)
        total = len(allocated)
        load = total if deployment.constraints.strategy == "spread" else -total
        candidates.append((mine, load, node.node_id))
    if candidates:
        return Decision(min(candidates)[2])
    if not refusals:
        return Decision(None, "no nodes")
    detail = ", ".join(f"{n} {why}" for why, n in sorted(refusals.items()))
    return Decision(None, f"no node fits: {detail}")


def place_replicas(
    deployment: Deployment,
    agent_ids: Sequence[str],
    nodes: Sequence[NodeSnapshot],
    allocations: Mapping[str, Sequence[Allocation]],
) -> dict[str, Decision]:
    """Place each of ``agent_ids`` in order, each seeing the ones placed before it."""
    current = {node_id: list(allocs) for node_id, allocs in allocations.items()}
    cpus, memory = demand(deployment)
    decisions: dict[str, Decision] = {}
    for agent_id in agent_ids:
        decision = choose_node(deployment, nodes, current)
        decisions[agent_id] = decision
        if decision.node_id is not None:
            current.setdefault(decision.node_id, []).append(
                Allocation(agent_id, deployment.name, cpus, memory)
            )
    return decisions
