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

What a node holds can be given as its allocations or, for callers placing
many replicas in one pass, as a :class:`NodeLoad` kept current as they go:
then judging one node costs the same however much it runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from schemas.api import Deployment
from schemas.node import NodeState

__all__ = [
    "Allocation",
    "Decision",
    "Loads",
    "NodeLoad",
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


@dataclass(slots=True)
class NodeLoad:
    """The sum of what is allocated on one node, updated as replicas come and go."""

    agents: int = 0
    cpus: float = 0.0
    memory_bytes: int = 0
    per_deployment: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, allocations: Iterable[Allocation]) -> NodeLoad:
        load = cls()
        for allocation in allocations:
            load.add(allocation)
        return load

    def add(self, a: Allocation) -> None:
        self.agents += 1
        self.cpus += a.cpus
        self.memory_bytes += a.memory_bytes
        self.per_deployment[a.deployment] = self.per_deployment.get(a.deployment, 0) + 1

    def remove(self, a: Allocation) -> None:
        self.agents -= 1
        self.cpus -= a.cpus
        self.memory_bytes -= a.memory_bytes
        left = self.per_deployment.get(a.deployment, 0) - 1
        if left > 0:
            self.per_deployment[a.deployment] = left
        else:
            self.per_deployment.pop(a.deployment, None)


Loads: TypeAlias = Mapping[str, NodeLoad] | Mapping[str, Sequence[Allocation]]
"""Node id -> what it holds, as a running sum or as its allocations."""

_EMPTY = NodeLoad()


def _load(loads: Loads, node_id: str) -> NodeLoad:
    held = loads.get(node_id)
    if held is None:
        return _EMPTY
    if isinstance(held, NodeLoad):
        return held
    return NodeLoad.of(held)


def demand(deployment: Deployment) -> tuple[float, int]:
    """The cpus and memory one replica reserves; an unset limit reserves nothing."""
    limits = deployment.spec.limits
    return (limits.cpus or 0.0, limits.memory_bytes or 0)


def _refusal(
    node: NodeSnapshot,
    deployment: Deployment,
    load: NodeLoad,
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
    mine = load.per_deployment.get(deployment.name, 0)
    if wanted.max_per_node is not None and mine >= wanted.max_per_node:
        return "max_per_node reached"
    cpus, memory = demand(deployment)
    if cpus > 0 and load.cpus + cpus > node.cpus + _EPSILON:
        return "not enough cpus"
    if memory > 0 and load.memory_bytes + memory > node.memory_bytes:
        return "not enough memory"
    return None


def choose_node(
    deployment: Deployment,
    nodes: Iterable[NodeSnapshot],
    allocations: Loads,
    *,
    exclude: Collection[str] = (),
) -> Decision:
    """The best node for one more replica of ``deployment``.

    ``allocations`` maps node id to what is assigned there already (any
    deployment); ``exclude`` lists nodes this replica must avoid (e.g. the
    node it just failed on).
    """
    best: tuple[int, int, str] | None = None
    refusals: dict[str, int] = {}
    spread = deployment.constraints.strategy == "spread"
    name = deployment.name
    for node in nodes:
        load = _load(allocations, node.node_id)
        why = _refusal(node, deployment, load, exclude)
        if why is not None:
            refusals[why] = refusals.get(why, 0) + 1
            continue
        rank = (
            load.per_deployment.get(name, 0),
            load.agents if spread else -load.agents,
            node.node_id,
        )
        if best is None or rank < best:
            best = rank
    if best is not None:
        return Decision(best[2])
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
    current = {node_id: NodeLoad.of(allocs) for node_id, allocs in allocations.items()}
    cpus, memory = demand(deployment)
    decisions: dict[str, Decision] = {}
    for agent_id in agent_ids:
        decision = choose_node(deployment, nodes, current)
        decisions[agent_id] = decision
        if decision.node_id is not None:
            current.setdefault(decision.node_id, NodeLoad()).add(
                Allocation(agent_id, deployment.name, cpus, memory)
            )
    return decisions
