"""Discovery on ``fabric.discover``: find nodes and agents by id, labels,
capability and state, and the task backlog per type. Answered by every
controller from the registry (nodes, agents) or from the task queue and the
task records (tasks). Read-only: a viewer may ask."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.agent import AgentStatus
from schemas.common import Labels, ShortText, Text, Timestamp
from schemas.ids import AgentId, NodeId, TaskType
from schemas.node import NodeInfo, NodeState

__all__ = ["DiscoverReply", "DiscoverRequest", "NodeRecord", "TaskBacklog"]

_Count = Annotated[int, msgspec.Meta(ge=0)]


class DiscoverRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every filter given must match (AND); an empty request lists everything up to ``limit``.

    ``what="tasks"``: the backlog of each task type; ``ids`` (if any) are the
    task types to report, the other filters do not apply.
    """

    what: Literal["nodes", "agents", "tasks"]
    ids: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=63)]], msgspec.Meta(max_length=1000)
    ] = []
    labels: Labels = {}
    capability: TaskType | None = None
    state: ShortText | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    token: Annotated[str, msgspec.Meta(max_length=8192)] | None = None


class NodeRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    info: NodeInfo
    state: NodeState
    last_heartbeat: Timestamp | None = None
    agents: Annotated[list[AgentId], msgspec.Meta(max_length=100_000)] = []


class TaskBacklog(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One task type's queue, fleet-wide (every controller's dispatching counts)."""

    type: TaskType
    backlog: _Count
    """Tasks stored in stream TASKS and not yet acked: not taken yet, waiting,
    or running."""
    running: _Count = 0
    """Tasks whose record says ``running`` (handed to an agent)."""
    waiting: _Count = 0
    """Tasks whose record says ``queued`` or ``failed``: taken at least once,
    not running now (no capable agent, limits, a retry's backoff)."""
    reasons: Annotated[dict[Text, _Count], msgspec.Meta(max_length=32)] = {}
    """Why the waiting ones wait, with how many wait for each reason."""


class DiscoverReply(
    msgspec.Struct,
    forbid_unknown_fields=True,
    frozen=True,
    kw_only=True,
    tag="result",
    tag_field="kind",
):
    nodes: Annotated[list[NodeRecord], msgspec.Meta(max_length=10_000)] = []
    agents: Annotated[list[AgentStatus], msgspec.Meta(max_length=10_000)] = []
    tasks: Annotated[list[TaskBacklog], msgspec.Meta(max_length=10_000)] = []
    truncated: bool = False
    answered_by: NodeId | None = None
