"""Nodes: who they are, how they are doing, and how they register."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from schemas.agent import AgentSpec, AgentState
from schemas.common import Labels, Seconds, ShortText, Timestamp
from schemas.ids import AgentId, NodeId, TaskType

__all__ = [
    "AgentSummary",
    "NodeHeartbeat",
    "NodeInfo",
    "NodeMetrics",
    "NodeResources",
    "NodeState",
    "Placement",
    "RegisterReply",
    "RegisterRequest",
]

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class NodeState(StrEnum):
    READY = "ready"
    SUSPECT = "suspect"
    LOST = "lost"
    DRAINING = "draining"
    CORDONED = "cordoned"


class NodeResources(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    cpus: NonNegFloat
    memory_bytes: NonNegInt


class NodeInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a node agent says about itself when it registers."""

    node_id: NodeId
    hostname: Annotated[str, msgspec.Meta(max_length=253)]
    pid: Annotated[int, msgspec.Meta(ge=1)]
    version: ShortText
    labels: Labels = {}
    capabilities: Annotated[list[TaskType], msgspec.Meta(max_length=256)] = []
    resources: NodeResources
    started_at: Timestamp


class NodeMetrics(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One sample of the host: CPU, memory, load and the state dir's disk."""

    cpu_percent: NonNegFloat
    memory_used_bytes: NonNegInt
    memory_total_bytes: NonNegInt
    load1: NonNegFloat
    load5: NonNegFloat
    load15: NonNegFloat
    disk_free_bytes: NonNegInt
    disk_total_bytes: NonNegInt


class AgentSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    agent_id: AgentId
    state: AgentState
    epoch: NonNegInt = 0
    pid: Annotated[int, msgspec.Meta(ge=1)] | None = None


class NodeHeartbeat(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Published on ``nodes.<node_id>.heartbeat`` every ``heartbeat_interval``."""

    node_id: NodeId
    seq: NonNegInt
    sent_at: Timestamp
    pid: Annotated[int, msgspec.Meta(ge=1)]
    draining: bool = False
    agents: Annotated[list[AgentSummary], msgspec.Meta(max_length=100_000)] = []
    metrics: NodeMetrics | None = None


class Placement(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One agent a node should run, fenced by its placement epoch."""

    spec: AgentSpec
    epoch: NonNegInt


class RegisterRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Sent on ``nodes.<node_id>.register``; the subject proves the sender."""

    node: NodeInfo
    agents: Annotated[list[AgentSummary], msgspec.Meta(max_length=100_000)] = []


class RegisterReply(
    msgspec.Struct,
    forbid_unknown_fields=True,
    frozen=True,
    kw_only=True,
    tag="result",
    tag_field="kind",
):
    """The controller's answer: what this node should run, and how often to beat."""

    node_id: NodeId
    agents: Annotated[list[Placement], msgspec.Meta(max_length=100_000)] = []
    heartbeat_interval: Seconds = 1.0
    node_timeout: Seconds = 3.0
