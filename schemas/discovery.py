"""Discovery on ``fabric.discover``: find nodes and agents by id, labels,
capability and state. Answered by every controller from the registry."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.agent import AgentStatus
from schemas.common import Labels, ShortText, Timestamp
from schemas.ids import AgentId, NodeId, TaskType
from schemas.node import NodeInfo, NodeState

__all__ = ["DiscoverReply", "DiscoverRequest", "NodeRecord"]


class DiscoverRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every filter given must match (AND); an empty request lists everything up to ``limit``."""

    what: Literal["nodes", "agents"]
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
    truncated: bool = False
    answered_by: NodeId | None = None
