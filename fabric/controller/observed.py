"""Observed agent state, kept coarse in KV so a new leader need not wait for it.

Bucket ``fabric_observed``: node id -> :class:`ObservedEntry`, the agents the
node last reported (id, state, epoch, pid), written by the leader only when
that set changes. Pure: :func:`changes` says which nodes to write.

Why per node and on change only: nodes heartbeat every 0.5 s and agents send
a status on every metrics tick (1 Hz), so writing what arrives would be about
2,000 node writes plus 10,000 agent writes per second for 1,000 nodes running
10,000 agents: far more than the registry's own write load and more than a
replicated KV write path on a small cluster takes (NATS-NOTES: 4-5 k awaited
JetStream writes/s). Kept coarse, a steady fleet writes nothing; a node whose
agents change is written once per reconcile pass at most, however many
heartbeats said so. Metrics and health stay in memory (and on
``agents.<id>.status`` for whoever wants them live).

Every controller receives the heartbeats, so a standby that has run a while
knows the fleet already; the bucket is for a controller that has just
started (all of them restarted, an upgrade) and must act before the first
heartbeats arrive, and for discovery answered by such a controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

import msgspec

from schemas.ids import NodeId
from schemas.node import AgentSummary

__all__ = ["ObservedEntry", "changes"]


class ObservedEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What one node last reported running, as the leader stored it."""

    node_id: NodeId
    agents: Annotated[list[AgentSummary], msgspec.Meta(max_length=100_000)] = []
    """Sorted by agent id."""
    updated_at: datetime


def changes(
    live: Mapping[str, Mapping[str, AgentSummary]],
    stored: Mapping[str, ObservedEntry],
) -> dict[str, list[AgentSummary]]:
    """Nodes whose reported agents differ from what is stored: node id -> agents.

    ``live`` holds what heartbeats said, for the nodes heard from; a node not
    heard from is left as stored (it may be lost, or this controller new).
    """
    out: dict[str, list[AgentSummary]] = {}
    for node_id, agents in sorted(live.items()):
        now = [agents[a] for a in sorted(agents)]
        before = stored.get(node_id)
        if before is None or before.agents != now:
            out[node_id] = now
    return out
