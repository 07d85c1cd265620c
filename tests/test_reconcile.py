"""Reconciliation: desired deployments vs observed nodes, table-driven."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.controller.placement import NodeSnapshot
from fabric.controller.reconcile import (
    Event,
    ObservedNode,
    Place,
    Plan,
    Remove,
    Snapshot,
    reconcile,
)
from schemas.agent import AgentSpec, AgentState
from schemas.api import Deployment, DeploymentRecord, ReplicaPlacement
from schemas.node import AgentSummary, NodeState

R, L, S, D = NodeState.READY, NodeState.LOST, NodeState.SUSPECT, NodeState.DRAINING
RUN, FAIL = AgentState.RUNNING, AgentState.FAILED


def record(
    name: str = "web",
    replicas: int = 1,
    placed: dict[str, tuple[str | None, int]] | None = None,
    *,
    generation: int = 1,
    deleting: bool = False,
    **flags: bool,
) -> DeploymentRecord:
    spec = AgentSpec(name=name, argv=["sleep", "100"])
    reps = [
        ReplicaPlacement(agent_id=a, node_id=n, epoch=e, generation=1, **flags)
        for a, (n, e) in (placed or {}).items()
    ]
    return DeploymentRecord(
        deployment=Deployment(spec=spec, replicas=replicas),
        generation=generation,
        deleting=deleting,
        replicas=reps,
    )


def nodes(**spec: tuple[NodeState, dict[str, tuple[AgentState, int]]]) -> dict[str, ObservedNode]:
    return {
        n: ObservedNode(
            NodeSnapshot(n, state),
            {a: AgentSummary(a, st_, e) for a, (st_, e) in agents.items()},
        )
        for n, (state, agents) in spec.items()
    }


def snap(
    records: list[DeploymentRecord], observed: dict[str, ObservedNode], revision: int = 10
) -> Snapshot:
    return Snapshot({r.name: (r, revision) for r in records}, observed)


def spec(agent_id: str) -> AgentSpec:
    return AgentSpec(name=agent_id, argv=["sleep", "100"])


def placements(plan: Plan, name: str = "web") -> dict[str, tuple[str | None, int]]:
    rec = next(d.record for d in plan.deployments if d.name == name)
    assert rec is not None
    return {p.agent_id: (p.node_id, p.epoch) for p in rec.replicas}


def test_new_deployment_spreads_with_new_epochs() -> None:
    plan = reconcile(snap([record(replicas=3)], nodes(n1=(R, {}), n2=(R, {}), n3=(R, {}))))
    assert plan.commands == [
        Place("n1", spec("web-0"), 11),
        Place("n2", spec("web-1"), 11),
        Place("n3", spec("web-2"), 11),
    ]
    assert placements(plan) == {"web-0": ("n1", 11), "web-1": ("n2", 11), "web-2": ("n3", 11)}
    assert plan.events == []  # a first placement replaces nothing


def test_steady_state_does_nothing() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(R, {"web": (RUN, 5)}), n2=(R, {}))))
    assert plan.commands == []
    assert not plan.deployments[0].changed


def test_placed_but_not_seen_is_asked_again_at_the_same_epoch() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(R, {}))))
    assert plan.commands == [Place("n1", spec("web"), 5)]
    assert not plan.deployments[0].changed


def test_lost_node_replica_moves_with_a_new_epoch_and_an_event() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(L, {"web": (RUN, 5)}), n2=(R, {}))))
    assert plan.commands == [Place("n2", spec("web"), 11)]  # nothing sent to a lost node
    assert plan.events == [
        Event(
            "agent.replaced",
            "web",
            {
                "agent_id": "web",
                "deployment": "web",
                "from_node": "n1",
                "to_node": "n2",
                "epoch": 11,
                "reason": "node lost",
            },
        )
    ]


def test_suspect_node_keeps_its_replica() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(S, {"web": (RUN, 5)}), n2=(R, {}))))
    assert plan.commands == []


def test_healed_node_stops_its_stale_copy_with_that_copys_epoch() -> None:
    # web moved to n2 at epoch 11 while n1 was lost; n1 is back running epoch 5.
    rec = record(placed={"web": ("n2", 11)})
    plan = reconcile(snap([rec], nodes(n1=(R, {"web": (RUN, 5)}), n2=(R, {"web": (RUN, 11)}))))
    assert plan.commands == [Remove("n1", "web", 5)]


def test_no_capacity_leaves_replica_waiting_with_a_reason() -> None:
    plan = reconcile(snap([record()], nodes(n1=(S, {}))))
    assert plan.commands == []
    rec = plan.deployments[0].record
    assert rec is not None
    assert rec.replicas[0].node_id is None
    assert rec.replicas[0].reason == "no node fits: 1 node suspect"


def test_failed_replica_is_replaced_once_elsewhere_then_reported() -> None:
    rec = record(placed={"web": ("n1", 5)})
    observed = nodes(n1=(R, {"web": (FAIL, 5)}), n2=(R, {}))
    plan = reconcile(snap([rec], observed))
    assert plan.commands == [Remove("n1", "web", 5), Place("n2", spec("web"), 11)]
    assert plan.events[0].data["reason"] == "failed"
    new = plan.deployments[0].record
    assert new is not None
    assert new.replicas[0].escalated

    # It fails on n2 as well: reported, left alone.
    observed = nodes(n1=(R, {}), n2=(R, {"web": (FAIL, 11)}))
    plan = reconcile(snap([new], observed, revision=12))
    assert plan.commands == []
    assert [e.kind for e in plan.events] == ["agent.failed"]
    final = plan.deployments[0].record
    assert final is not None
    assert final.replicas[0].failed
    # ...and stays quiet afterwards.
    assert reconcile(snap([final], observed, revision=13)).events == []


def test_failed_with_nowhere_else_to_go_is_reported() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(R, {"web": (FAIL, 5)}))))
    assert [e.kind for e in plan.events] == ["agent.failed"]


def test_draining_node_moves_its_replicas() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(D, {"web": (RUN, 5)}), n2=(R, {}))))
    assert plan.commands == [Remove("n1", "web", 5), Place("n2", spec("web"), 11)]


def test_draining_node_keeps_replica_when_nowhere_else() -> None:
    rec = record(placed={"web": ("n1", 5)})
    plan = reconcile(snap([rec], nodes(n1=(D, {"web": (RUN, 5)}))))
    assert plan.commands == []


def test_update_replaces_in_place_with_a_new_epoch() -> None:
    rec = record(placed={"web": ("n1", 5)}, generation=2)
    plan = reconcile(snap([rec], nodes(n1=(R, {"web": (RUN, 5)}), n2=(R, {}))))
    assert plan.commands == [Place("n1", spec("web"), 11)]


def test_scale_down_removes_the_extra_replicas() -> None:
    rec = record(replicas=2, placed={"web-0": ("n1", 5), "web-1": ("n2", 5), "web-2": ("n3", 5)})
    observed = nodes(
        n1=(R, {"web-0": (RUN, 5)}), n2=(R, {"web-1": (RUN, 5)}), n3=(R, {"web-2": (RUN, 5)})
    )
    plan = reconcile(snap([rec], observed))
    assert plan.commands == [Remove("n3", "web-2", 5)]
    assert set(placements(plan)) == {"web-0", "web-1"}


def test_delete_removes_everything_and_the_record() -> None:
    rec = record(placed={"web": ("n1", 5)}, deleting=True)
    plan = reconcile(snap([rec], nodes(n1=(R, {"web": (RUN, 5)}))))
    assert plan.commands == [Remove("n1", "web", 5)]
    assert plan.deployments[0].record is None
    assert plan.deployments[0].changed


def test_hand_placed_agents_are_never_swept() -> None:
    plan = reconcile(snap([], nodes(n1=(R, {"manual": (RUN, 0), "orphan": (RUN, 4)}))))
    assert plan.commands == [Remove("n1", "orphan", 4)]


def test_epoch_grows_past_the_revision_and_the_old_epoch() -> None:
    rec = record(placed={"web": ("n1", 50)})
    plan = reconcile(snap([rec], nodes(n1=(L, {}), n2=(R, {}))))
    assert plan.commands == [Place("n2", spec("web"), 51)]


@pytest.mark.parametrize("state", [R, S, D, L])
def test_reconcile_is_deterministic(state: NodeState) -> None:
    rec = record(replicas=3, placed={"web-0": ("n1", 2)})
    observed = nodes(n1=(state, {"web-0": (RUN, 2)}), n2=(R, {}), n3=(R, {}))
    assert reconcile(snap([rec], observed)) == reconcile(snap([rec], observed))


# --- property: at most one live copy after applying a plan ---------------------


def _apply(s: Snapshot, plan: Plan) -> Snapshot:
    """Simulate a perfect fleet: every command reaches a non-lost node."""
    observed = {n: dict(o.agents) for n, o in s.nodes.items()}
    for c in plan.commands:
        if s.nodes[c.node_id].state is L:
            continue
        if isinstance(c, Remove):
            seen = observed[c.node_id].get(c.agent_id)
            if seen is not None and c.epoch >= seen.epoch:
                del observed[c.node_id][c.agent_id]
        else:
            observed[c.node_id][c.agent_id] = AgentSummary(c.agent_id, RUN, c.epoch)
    deployments = {
        d.name: (d.record, d.revision + 1) for d in plan.deployments if d.record is not None
    }
    return Snapshot(
        deployments, {n: ObservedNode(o.snapshot, observed[n]) for n, o in s.nodes.items()}
    )


@settings(max_examples=200, deadline=None)
@given(
    replicas=st.integers(0, 4),
    states=st.lists(st.sampled_from([R, L, S, D]), min_size=1, max_size=4),
    stale=st.dictionaries(st.integers(0, 3), st.integers(1, 9), max_size=4),
    heal=st.booleans(),
)
def test_property_one_live_copy_after_heal(
    replicas: int, states: list[NodeState], stale: dict[int, int], heal: bool
) -> None:
    names = [f"n{i}" for i in range(len(states))]
    observed = {
        n: ObservedNode(
            NodeSnapshot(n, s),
            {"web": AgentSummary("web", RUN, stale[i])} if i in stale else {},
        )
        for i, (n, s) in enumerate(zip(names, states, strict=True))
    }
    rec = record(replicas=replicas)
    s = snap([rec], observed)
    for _ in range(3):
        s = _apply(s, reconcile(s))
    if heal:
        s = Snapshot(
            s.deployments,
            {
                n: ObservedNode(dataclasses.replace(o.snapshot, state=R), o.agents)
                if o.state is L
                else o
                for n, o in s.nodes.items()
            },
        )
    for _ in range(3):
        s = _apply(s, reconcile(s))
    live: dict[str, list[str]] = {}
    for n, o in s.nodes.items():
        if o.state is L:
            continue
        for agent_id in o.agents:
            live.setdefault(agent_id, []).append(n)
    assert all(len(v) == 1 for v in live.values()), live


# --- a bounded pass ------------------------------------------------------------


def test_budget_spreads_a_big_placement_over_passes_that_converge() -> None:
    # Each search looks at 3 nodes (3 units); a budget of 6 places two replicas a pass.
    observed = nodes(n1=(R, {}), n2=(R, {}), n3=(R, {}))
    records = [record("web", replicas=3), record("api", replicas=2)]
    first = reconcile(snap(records, observed), budget=6)
    assert [c.agent_id for c in first.commands] == ["api-0", "api-1"]
    web = next(d for d in first.deployments if d.name == "web")
    assert not web.changed  # waiting replicas keep their record: nothing to write
    records = [d.record for d in first.deployments if d.record is not None]
    second = reconcile(snap(records, observed), budget=6)
    assert sorted(placements(second, "web")) == ["web-0", "web-1"]
    records = [d.record for d in second.deployments if d.record is not None]
    third = reconcile(snap(records, observed), budget=6)
    assert sorted(placements(third, "web")) == ["web-0", "web-1", "web-2"]
    # The same spread as one unbounded pass: the budget only defers.
    unbounded = reconcile(snap([record("web", replicas=3), record("api", replicas=2)], observed))
    assert placements(third, "web") == placements(unbounded, "web")


def test_budget_defers_a_failover_and_an_escalation_without_failing_them() -> None:
    lost = record(placed={"web": ("n1", 5)})
    failed = record("job", placed={"job": ("n2", 7)})
    observed = nodes(n1=(L, {}), n2=(R, {"job": (FAIL, 7)}), n3=(R, {}))
    plan = reconcile(snap([lost, failed], observed), budget=0)
    assert plan.commands == []
    assert not any(d.changed for d in plan.deployments)
    plan = reconcile(snap([lost, failed], observed), budget=100)
    assert placements(plan, "job")["job"][0] == "n3"  # "job" first: names in order
    assert placements(plan) == {"web": ("n2", 11)}
