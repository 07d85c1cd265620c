"""The self-fencing clock (pure); the real partition is in tests/test_fleet.py."""

from __future__ import annotations

from node_agent.fencing import PartitionFence


def test_standalone_node_never_fences() -> None:
    fence = PartitionFence()
    assert not fence.must_fence(1e9)


def test_fences_once_after_two_thirds_of_node_timeout_then_lifts_on_contact() -> None:
    fence = PartitionFence()
    fence.arm(node_timeout=1.5, now=100.0)
    assert not fence.must_fence(100.9)
    fence.contact(100.9)
    assert not fence.must_fence(101.8)
    assert fence.must_fence(102.0)
    assert not fence.must_fence(103.0), "only once per partition"
    assert fence.contact(104.0) is True
    assert fence.contact(104.5) is False
    assert not fence.must_fence(105.0)
    assert fence.must_fence(105.6)
