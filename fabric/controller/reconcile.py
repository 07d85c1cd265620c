"""Reconciliation: desired deployments vs observed nodes -> records, commands, events.

Pure: a :class:`Snapshot` in, a :class:`Plan` out; the leader's loop writes
the records (compare-and-set), then sends the commands and publishes the
events. Run again on the next snapshot, it converges: a command already done
is not asked for again, because the snapshot then shows its effect.

Per replica of each deployment (in name, then index order)::

    not placed, or its node lost/unknown ──▶ place on the best node, epoch+1
                                             (agent.replaced when it had a node)
    failed on its node (restart budget) ───▶ re-place once elsewhere, epoch+1;
                                             failed again ──▶ marked failed (agent.failed)
    its node draining ─────────────────────▶ move elsewhere, epoch+1
    deployment updated (generation) ───────▶ place again on the same node, epoch+1
    placed, not seen at its epoch ─────────▶ place again (same epoch: idempotent)
    replica no longer wanted ──────────────▶ remove from its node

Fencing: every new placement gets an epoch greater than any before it for
that agent id (``max(old epoch, record revision) + 1``; the KV revision grows
across deletes and re-creates). Then a sweep over every reachable node
removes any copy of a controller-placed agent (epoch > 0) that is not the
current placement, naming that copy's own epoch: a node back from a
partition stops its stale copy, so no two copies of one replica stay alive.
Agents with epoch 0 were placed by hand and are never swept.

Work per pass is bounded: each search for a node costs one unit per node
looked at, and once ``budget`` units are spent the replicas still to move
keep their record as it is until the next pass (a cold start or a scale-up
of thousands of replicas then spreads over a few passes instead of holding
the loop for seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fabric.controller.placement import (
    Allocation,
    Decision,
    NodeLoad,
    NodeSnapshot,
    choose_node,
    demand,
)
from schemas.agent import AgentSpec, AgentState
from schemas.api import DeploymentRecord, ReplicaPlacement, replica_ids
from schemas.node import AgentSummary, NodeState

__all__ = [
    "DeploymentPlan",
    "Event",
    "ObservedNode",
    "Place",
    "Plan",
    "Remove",
    "Snapshot",
    "reconcile",
]


@dataclass(frozen=True, slots=True)
class ObservedNode:
    """A node as the controller sees it: placement facts plus what it reports running."""

    snapshot: NodeSnapshot
    agents: Mapping[str, AgentSummary] = field(default_factory=dict)

    @property
    def state(self) -> NodeState:
        return self.snapshot.state


@dataclass(frozen=True, slots=True)
class Snapshot:
    deployments: Mapping[str, tuple[DeploymentRecord, int]]
    """name -> (record, KV revision)."""
    nodes: Mapping[str, ObservedNode]


@dataclass(frozen=True, slots=True)
class Place:
    node_id: str
    spec: AgentSpec
    epoch: int

    @property
    def agent_id(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class Remove:
    node_id: str
    agent_id: str
    epoch: int


Command = Place | Remove


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    subject: str
    data: dict[str, Any]


@dataclass(slots=True)
class DeploymentPlan:
    """What to do for one deployment. ``record`` is what to write back (None:
    delete the key); commands and events apply only once that write won."""

    name: str
    revision: int
    changed: bool
    record: DeploymentRecord | None
    commands: list[Command] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    deployments: list[DeploymentPlan] = field(default_factory=list)
    sweep: list[Remove] = field(default_factory=list)
    """Stale copies to stop; they need no record write."""

    @property
    def commands(self) -> list[Command]:
        out: list[Command] = [c for d in self.deployments for c in d.commands]
        return out + list(self.sweep)

    @property
    def events(self) -> list[Event]:
        return [e for d in self.deployments for e in d.events]


def _alive(nodes: Mapping[str, ObservedNode], node_id: str | None) -> ObservedNode | None:
    """The node if it may still be running our copy and can be told things."""
    if node_id is None:
        return None
    node = nodes.get(node_id)
    if node is None or node.state is NodeState.LOST:
        return None
    return node


class _Allocations:
    """What every node holds, kept current while replicas move during one pass,
    and what is left of the pass's budget for searching nodes.

    Built on first use: a pass with nothing to place never sums the fleet.
    """

    def __init__(self, snapshot: Snapshot, budget: int | None) -> None:
        self._snapshot = snapshot
        self._loads: dict[str, NodeLoad] | None = None
        self._where: dict[str, tuple[str, Allocation]] = {}
        self._gone: set[str] = set()
        self.budget = budget

    @property
    def by_node(self) -> dict[str, NodeLoad]:
        if self._loads is None:
            self._loads = {}
            for name, (record, _) in sorted(self._snapshot.deployments.items()):
                cpus, memory = demand(record.deployment)
                for p in record.replicas:
                    if p.node_id is not None and not p.failed and p.agent_id not in self._gone:
                        self.add(p.node_id, Allocation(p.agent_id, name, cpus, memory))
        return self._loads

    def add(self, node_id: str, allocation: Allocation) -> None:
        self.by_node.setdefault(node_id, NodeLoad()).add(allocation)
        self._where[allocation.agent_id] = (node_id, allocation)

    def drop(self, node_id: str | None, agent_id: str) -> None:
        if self._loads is None:
            self._gone.add(agent_id)  # left out when the loads are first summed
            return
        found = self._where.get(agent_id)
        if node_id is None or found is None or found[0] != node_id:
            return
        self._loads[node_id].remove(found[1])
        del self._where[agent_id]

    def spend(self, cost: int) -> bool:
        """Take ``cost`` units of the budget; False (nothing taken) once it is spent."""
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= max(cost, 1)
        return True


def _epoch(p: ReplicaPlacement, revision: int) -> int:
    return max(p.epoch, revision) + 1


def _spec_for(record: DeploymentRecord, agent_id: str) -> AgentSpec:
    return msgspec.structs.replace(record.deployment.spec, name=agent_id)


def _plan_deployment(
    record: DeploymentRecord,
    revision: int,
    nodes: Mapping[str, ObservedNode],
    snapshots: list[NodeSnapshot],
    allocs: _Allocations,
) -> DeploymentPlan:
    name = record.name
    deployment = record.deployment
    cpus, memory = demand(deployment)
    desired = [] if record.deleting else replica_ids(name, deployment.replicas)
    existing = {p.agent_id: p for p in record.replicas}
    commands: list[Command] = []
    events: list[Event] = []
    kept: list[ReplicaPlacement] = []

    for agent_id, p in sorted(existing.items()):
        if agent_id in desired:
            continue
        node = _alive(nodes, p.node_id)
        if node is not None and p.node_id is not None:
            commands.append(Remove(p.node_id, agent_id, p.epoch))
        allocs.drop(p.node_id, agent_id)

    def move(p: ReplicaPlacement, reason: str, exclude: set[str], **extra: Any) -> Decision | None:
        """Move ``p`` to the best node: the decision (node None: none fits), or
        None when the pass's budget is spent and ``p`` must wait for the next."""
        if not allocs.spend(len(snapshots)):
            return None
        decision = choose_node(deployment, snapshots, allocs.by_node, exclude=exclude)
        if decision.node_id is None:
            return decision
        epoch = _epoch(p, revision)
        allocs.drop(p.node_id, p.agent_id)
        allocs.add(decision.node_id, Allocation(p.agent_id, name, cpus, memory))
        old = _alive(nodes, p.node_id)
        if old is not None and p.node_id is not None:
            commands.append(Remove(p.node_id, p.agent_id, p.epoch))
        commands.append(Place(decision.node_id, _spec_for(record, p.agent_id), epoch))
        if p.node_id is not None:
            data = {
                "agent_id": p.agent_id,
                "deployment": name,
                "from_node": p.node_id,
                "to_node": decision.node_id,
                "epoch": epoch,
                "reason": reason,
            }
            events.append(Event("agent.replaced", p.agent_id, data))
        kept.append(
            msgspec.structs.replace(
                p,
                node_id=decision.node_id,
                epoch=epoch,
                generation=record.generation,
                reason="",
                **extra,
            )
        )
        return decision

    for agent_id in desired:
        p = existing.get(agent_id) or ReplicaPlacement(agent_id=agent_id)
        node = _alive(nodes, p.node_id)
        if p.failed:
            kept.append(p)
            continue
        if node is None or p.node_id is None:
            # Never placed, waiting for capacity, or its node is lost.
            decision = move(p, "node lost" if p.node_id is not None else "placed", set())
            if decision is None:
                if agent_id in existing:
                    kept.append(p)  # out of budget: as it was, until the next pass
            elif decision.node_id is None:
                allocs.drop(p.node_id, agent_id)
                kept.append(msgspec.structs.replace(p, node_id=None, reason=decision.reason))
            continue
        seen = node.agents.get(agent_id)
        if seen is not None and seen.epoch == p.epoch and seen.state is AgentState.FAILED:
            # Escalation: the node spent its restart budget; try elsewhere once.
            decision = None if p.escalated else move(p, "failed", {p.node_id}, escalated=True)
            if decision is None and not p.escalated:
                kept.append(p)  # out of budget: next pass
            elif decision is None or decision.node_id is None:
                kept.append(msgspec.structs.replace(p, failed=True, reason="failed"))
                data = {"agent_id": agent_id, "deployment": name, "node_id": p.node_id}
                events.append(Event("agent.failed", agent_id, data))
            continue
        if node.state is NodeState.DRAINING:
            decision = move(p, "drain", {p.node_id})
            if decision is not None and decision.node_id is not None:
                continue
        if p.generation != record.generation:
            epoch = _epoch(p, revision)
            commands.append(Place(p.node_id, _spec_for(record, agent_id), epoch))
            kept.append(
                msgspec.structs.replace(p, epoch=epoch, generation=record.generation, reason="")
            )
            continue
        if seen is None or seen.epoch < p.epoch:
            # Placed but not seen yet (in flight, or lost by the node): ask again.
            commands.append(Place(p.node_id, _spec_for(record, agent_id), p.epoch))
        kept.append(p)

    new: DeploymentRecord | None = msgspec.structs.replace(record, replicas=kept)
    if record.deleting and not kept:
        new = None
    return DeploymentPlan(
        name=name,
        revision=revision,
        changed=new != record,
        record=new,
        commands=commands,
        events=events,
    )


def _sweep(plans: list[DeploymentPlan], nodes: Mapping[str, ObservedNode]) -> list[Remove]:
    current: dict[str, ReplicaPlacement] = {}
    for plan in plans:
        if plan.record is not None:
            current.update({p.agent_id: p for p in plan.record.replicas})
    asked = {(c.node_id, c.agent_id) for plan in plans for c in plan.commands}
    out: list[Remove] = []
    for node_id, node in sorted(nodes.items()):
        if node.state is NodeState.LOST:
            continue
        for agent_id, seen in sorted(node.agents.items()):
            if seen.epoch == 0 or (node_id, agent_id) in asked:
                continue
            p = current.get(agent_id)
            if p is not None and p.node_id == node_id:
                continue
            out.append(Remove(node_id, agent_id, seen.epoch))
    return out


def reconcile(snapshot: Snapshot, *, budget: int | None = None) -> Plan:
    """Everything to do to move the observed fleet toward the desired one.

    ``budget``: node evaluations this pass may spend searching (None: no limit).
    """
    allocs = _Allocations(snapshot, budget)
    snapshots = [n.snapshot for _, n in sorted(snapshot.nodes.items())]
    plans = [
        _plan_deployment(record, revision, snapshot.nodes, snapshots, allocs)
        for _, (record, revision) in sorted(snapshot.deployments.items())
    ]
    return Plan(deployments=plans, sweep=_sweep(plans, snapshot.nodes))
