"""Placement: table-driven rules and a property over random snapshots."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.controller.placement import (
    Allocation,
    NodeLoad,
    NodeSnapshot,
    choose_node,
    demand,
    place_replicas,
)
from schemas.agent import AgentSpec, Limits
from schemas.api import Constraints, Deployment, replica_ids
from schemas.node import NodeState

GiB = 1 << 30


def dep(
    name: str = "web",
    replicas: int = 1,
    *,
    cpus: float | None = None,
    memory: int | None = None,
    **constraints: Any,
) -> Deployment:
    spec = AgentSpec(name=name, argv=["true"], limits=Limits(cpus=cpus, memory_bytes=memory))
    return Deployment(spec=spec, replicas=replicas, constraints=Constraints(**constraints))


def node(node_id: str, state: NodeState = NodeState.READY, **kw: Any) -> NodeSnapshot:
    kw.setdefault("cpus", 4.0)
    kw.setdefault("memory_bytes", 8 * GiB)
    if "capabilities" in kw:
        kw["capabilities"] = frozenset(kw["capabilities"])
    return NodeSnapshot(node_id, state, **kw)


def allocs(**per_node: list[tuple[str, str]]) -> dict[str, list[Allocation]]:
    return {n: [Allocation(a, d) for a, d in items] for n, items in per_node.items()}


THREE = [node("n1"), node("n2"), node("n3")]

# (case id, deployment, nodes, allocations, exclude, expected node or None)
CASES: list[
    tuple[str, Deployment, list[NodeSnapshot], dict[str, list[Allocation]], set[str], Any]
] = [
    ("empty fleet", dep(), [], {}, set(), None),
    ("ties broken by id", dep(), THREE, {}, set(), "n1"),
    ("ties broken by id, any input order", dep(), THREE[::-1], {}, set(), "n1"),
    (
        "spread: fewest agents",
        dep(),
        THREE,
        allocs(n1=[("a", "x")], n2=[("b", "x"), ("c", "y")]),
        set(),
        "n3",
    ),
    (
        "pack: most agents",
        dep(strategy="pack"),
        THREE,
        allocs(n1=[("a", "x")], n2=[("b", "x"), ("c", "y")]),
        set(),
        "n2",
    ),
    (
        "pack still avoids a node holding this deployment",
        dep(strategy="pack"),
        THREE,
        allocs(n1=[("a", "x")], n2=[("web-0", "web"), ("c", "y")]),
        set(),
        "n1",
    ),
    (
        "spread prefers no replica of this deployment over a lighter node",
        dep(),
        [node("n1"), node("n2")],
        allocs(n1=[("web-0", "web")], n2=[("a", "x"), ("b", "y")]),
        set(),
        "n2",
    ),
    ("suspect refused", dep(), [node("n1", NodeState.SUSPECT), node("n2")], {}, set(), "n2"),
    ("lost refused", dep(), [node("n1", NodeState.LOST)], {}, set(), None),
    ("draining refused", dep(), [node("n1", NodeState.DRAINING)], {}, set(), None),
    ("cordoned refused", dep(), [node("n1", NodeState.CORDONED)], {}, set(), None),
    ("excluded refused", dep(), [node("n1"), node("n2")], {}, {"n1"}, "n2"),
    (
        "required label",
        dep(labels={"zone": "b"}),
        [node("n1", labels={"zone": "a"}), node("n2", labels={"zone": "b"})],
        {},
        set(),
        "n2",
    ),
    ("label missing everywhere", dep(labels={"zone": "b"}), THREE, {}, set(), None),
    (
        "required capabilities: all of them",
        dep(capabilities=["gpu", "ssd"]),
        [node("n1", capabilities={"gpu"}), node("n2", capabilities={"gpu", "ssd", "x"})],
        {},
        set(),
        "n2",
    ),
    (
        "cpu: fits exactly",
        dep(cpus=1.0),
        [node("n1", cpus=1.0)],
        {},
        set(),
        "n1",
    ),
    (
        "cpu: full node refused",
        dep(cpus=1.0),
        [node("n1", cpus=2.0), node("n2", cpus=2.0)],
        {"n1": [Allocation("a", "x", cpus=1.5)]},
        set(),
        "n2",
    ),
    (
        "cpu: float sums that drift still fit",
        dep(cpus=0.1),
        [node("n1", cpus=0.3)],
        {"n1": [Allocation("a", "x", cpus=0.1), Allocation("b", "x", cpus=0.1)]},
        set(),
        "n1",
    ),
    (
        "memory: not enough anywhere",
        dep(memory=4 * GiB),
        [node("n1", memory_bytes=2 * GiB)],
        {},
        set(),
        None,
    ),
    (
        "memory: used memory counts",
        dep(memory=2 * GiB),
        [node("n1", memory_bytes=4 * GiB), node("n2", memory_bytes=4 * GiB)],
        {"n1": [Allocation("a", "x", memory_bytes=3 * GiB)]},
        set(),
        "n2",
    ),
    (
        "no limits fit a node of unknown size",
        dep(),
        [node("n1", cpus=0, memory_bytes=0)],
        {},
        set(),
        "n1",
    ),
    (
        "max_per_node",
        dep(max_per_node=1),
        [node("n1")],
        allocs(n1=[("web-0", "web")]),
        set(),
        None,
    ),
    (
        "max_per_node counts only this deployment",
        dep(max_per_node=1),
        [node("n1")],
        allocs(n1=[("a", "x"), ("b", "x")]),
        set(),
        "n1",
    ),
]


@pytest.mark.parametrize(
    ("deployment", "nodes", "allocations", "exclude", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_choose_node(
    deployment: Deployment,
    nodes: list[NodeSnapshot],
    allocations: dict[str, list[Allocation]],
    exclude: set[str],
    expected: str | None,
) -> None:
    decision = choose_node(deployment, nodes, allocations, exclude=exclude)
    assert decision.node_id == expected
    if expected is None:
        assert decision.reason


def test_refusal_reason_counts_each_cause() -> None:
    nodes = [node("n1", NodeState.LOST), node("n2", NodeState.LOST), node("n3", labels={})]
    decision = choose_node(dep(labels={"zone": "a"}), nodes, {})
    assert decision.reason == "no node fits: 1 label zone=a missing, 2 node lost"


def test_three_replicas_spread_over_three_nodes() -> None:
    d = dep(replicas=3)
    decisions = place_replicas(d, replica_ids("web", 3), THREE, {})
    assert {k: v.node_id for k, v in decisions.items()} == {
        "web-0": "n1",
        "web-1": "n2",
        "web-2": "n3",
    }


def test_more_replicas_than_nodes_doubles_up_evenly() -> None:
    decisions = place_replicas(dep(replicas=5), replica_ids("web", 5), THREE, {})
    assert Counter(d.node_id for d in decisions.values()) == {"n1": 2, "n2": 2, "n3": 1}


def test_max_per_node_leaves_the_rest_unplaced() -> None:
    decisions = place_replicas(dep(replicas=4, max_per_node=1), replica_ids("web", 4), THREE, {})
    assert [d.node_id for d in decisions.values()] == ["n1", "n2", "n3", None]


def test_pack_fills_one_node_when_replicas_may_share() -> None:
    # Two replicas, one node only allowed: pack puts both there.
    d = dep(replicas=2, strategy="pack", labels={"big": "yes"})
    nodes = [node("n1"), node("n2", labels={"big": "yes"})]
    decisions = place_replicas(d, replica_ids("web", 2), nodes, {})
    assert {v.node_id for v in decisions.values()} == {"n2"}


def test_replica_ids() -> None:
    assert replica_ids("web", 1) == ["web"]
    assert replica_ids("web", 3) == ["web-0", "web-1", "web-2"]
    assert replica_ids("web", 0) == []


def test_names_too_long_for_their_replica_ids_are_refused() -> None:
    long = "a" * 62
    Deployment(spec=AgentSpec(name=long, argv=["x"]), replicas=1)
    with pytest.raises(ValueError, match="too long"):
        Deployment(spec=AgentSpec(name=long, argv=["x"]), replicas=2)
    data = msgspec.json.encode({"spec": {"name": long, "argv": ["x"]}, "replicas": 2})
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(data, type=Deployment)


def test_demand() -> None:
    assert demand(dep(cpus=0.5, memory=GiB)) == (0.5, GiB)
    assert demand(dep()) == (0.0, 0)


# --- property: never violates a constraint, always the same answer -------------

states = st.sampled_from(list(NodeState))
node_strategy = st.builds(
    NodeSnapshot,
    node_id=st.sampled_from([f"n{i}" for i in range(6)]),
    state=states,
    labels=st.dictionaries(st.sampled_from(["zone", "tier"]), st.sampled_from(["a", "b"])),
    capabilities=st.frozensets(st.sampled_from(["gpu", "ssd"])),
    cpus=st.sampled_from([0.0, 1.0, 2.0, 4.0]),
    memory_bytes=st.sampled_from([0, GiB, 4 * GiB]),
)
deployment_strategy = st.builds(
    dep,
    replicas=st.integers(1, 8),
    cpus=st.sampled_from([None, 0.5, 1.0]),
    memory=st.sampled_from([None, GiB]),
    labels=st.dictionaries(st.sampled_from(["zone", "tier"]), st.sampled_from(["a", "b"])),
    capabilities=st.lists(st.sampled_from(["gpu", "ssd"]), unique=True),
    strategy=st.sampled_from(["spread", "pack"]),
    max_per_node=st.sampled_from([None, 1, 2]),
)


@settings(max_examples=300, deadline=None)
@given(
    d=deployment_strategy,
    raw_nodes=st.lists(node_strategy, max_size=6, unique_by=lambda n: n.node_id),
)
def test_property_constraints_hold_and_answers_repeat(
    d: Deployment, raw_nodes: list[NodeSnapshot]
) -> None:
    ids = replica_ids(d.name, d.replicas)
    first = place_replicas(d, ids, raw_nodes, {})
    assert place_replicas(d, ids, list(reversed(raw_nodes)), {}) == first
    by_id = {n.node_id: n for n in raw_nodes}
    placed = [v.node_id for v in first.values() if v.node_id is not None]
    cpus, memory = demand(d)
    for node_id, count in Counter(placed).items():
        n = by_id[node_id]
        assert n.state is NodeState.READY
        assert all(n.labels.get(k) == v for k, v in d.constraints.labels.items())
        assert set(d.constraints.capabilities) <= n.capabilities
        if d.constraints.max_per_node is not None:
            assert count <= d.constraints.max_per_node
        assert cpus * count <= n.cpus + 1e-9 or cpus == 0
        assert memory * count <= n.memory_bytes or memory == 0
    # Replicas share a node only when no eligible node was left without one.
    counts = Counter(placed)
    if counts and max(counts.values()) > 1:
        eligible = {nid for nid, v in by_id.items() if choose_node(d, [v], {}).node_id is not None}
        assert eligible <= set(placed)


# --- running sums: the same answers as the allocations they sum ------------------

allocation_strategy = st.builds(
    Allocation,
    agent_id=st.sampled_from([f"a{i}" for i in range(8)]),
    deployment=st.sampled_from(["web", "api"]),
    cpus=st.sampled_from([0.0, 0.5, 1.0]),
    memory_bytes=st.sampled_from([0, GiB]),
)


@settings(max_examples=200, deadline=None)
@given(
    d=deployment_strategy,
    raw_nodes=st.lists(node_strategy, max_size=6, unique_by=lambda n: n.node_id),
    held=st.dictionaries(
        st.sampled_from([f"n{i}" for i in range(6)]), st.lists(allocation_strategy, max_size=4)
    ),
)
def test_property_loads_decide_like_allocations(
    d: Deployment, raw_nodes: list[NodeSnapshot], held: dict[str, list[Allocation]]
) -> None:
    loads = {n: NodeLoad.of(a) for n, a in held.items()}
    assert choose_node(d, raw_nodes, loads) == choose_node(d, raw_nodes, held)


def test_node_load_add_and_remove_balance() -> None:
    a, b = Allocation("a", "web", 0.5, GiB), Allocation("b", "api", 1.0, 0)
    load = NodeLoad.of([a, b])
    assert (load.agents, load.cpus, load.memory_bytes) == (2, 1.5, GiB)
    assert load.per_deployment == {"web": 1, "api": 1}
    load.remove(a)
    assert load.per_deployment == {"api": 1}
    load.remove(b)
    assert load == NodeLoad()
