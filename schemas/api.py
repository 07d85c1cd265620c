"""The operator API on ``fabric.api.<method>`` and the deployment records behind it.

A *deployment* is an agent spec, a replica count and placement constraints.
Its replicas run as agents named ``<name>`` (one replica) or
``<name>-<index>`` (several). The controller keeps one
:class:`DeploymentRecord` per deployment in the ``fabric_agents`` KV bucket:
the desired shape plus, per replica, where it runs and at which placement
epoch.

Methods and their request types (every request carries a token)::

    create    CreateDeployment   agents:run     idempotent: same deployment twice is a no-op
    update    UpdateDeployment   agents:run
    scale     ScaleDeployment    agents:run
    delete    DeleteDeployment   agents:stop
    get       GetDeployment      read
    list      ListDeployments    read
    drain     NodeRequest        nodes:admin
    cordon    NodeRequest        nodes:admin
    uncordon  NodeRequest        nodes:admin

Each gets one reply: :class:`ApiResult` (``"kind": "result"``) or an
:class:`~schemas.errors.ErrorReply` (``"kind": "error"``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.agent import AgentSpec
from schemas.common import Labels, Text
from schemas.discovery import NodeRecord
from schemas.ids import AgentId, NodeId, TaskType

__all__ = [
    "API_METHODS",
    "ApiResult",
    "Constraints",
    "CreateDeployment",
    "DeleteDeployment",
    "Deployment",
    "DeploymentRecord",
    "GetDeployment",
    "ListDeployments",
    "NodeRequest",
    "ReplicaPlacement",
    "ScaleDeployment",
    "UpdateDeployment",
    "replica_ids",
]

MAX_REPLICAS = 1000
Token = Annotated[str, msgspec.Meta(max_length=8192, description="A signed operator token (JWT).")]
Replicas = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class Constraints(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where the replicas may run, and how they are spread."""

    labels: Labels = {}
    """Every label here must be on the node with this value."""
    capabilities: Annotated[list[TaskType], msgspec.Meta(max_length=64)] = []
    """Every capability here must be offered by the node."""
    strategy: Literal["spread", "pack"] = "spread"
    max_per_node: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] | None = None


class Deployment(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The desired state: run ``replicas`` copies of ``spec`` under ``constraints``."""

    spec: AgentSpec
    replicas: Replicas = 1
    constraints: Constraints = Constraints()

    def __post_init__(self) -> None:
        # Replica ids must stay valid ids: the longest suffix must fit in 63 characters.
        if self.replicas > 1 and len(self.spec.name) + 1 + len(str(self.replicas - 1)) > 63:
            raise ValueError(
                f"name {self.spec.name!r} is too long for {self.replicas} replicas"
                " (replica ids are <name>-<index>, at most 63 characters)"
            )

    @property
    def name(self) -> str:
        return self.spec.name


def replica_ids(name: str, replicas: int) -> list[str]:
    """The agent ids of a deployment's replicas, in index order."""
    if replicas == 1:
        return [name]
    return [f"{name}-{i}" for i in range(replicas)]


class ReplicaPlacement(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where one replica should run; ``node_id`` None means it waits for capacity."""

    agent_id: AgentId
    node_id: NodeId | None = None
    epoch: NonNegInt = 0
    generation: NonNegInt = 0
    """The deployment generation this copy was placed with; older means re-place."""
    escalated: bool = False
    """Already re-placed once because it failed on its node."""
    failed: bool = False
    """Failed again after the escalation: left alone and reported."""
    reason: Text = ""


class DeploymentRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One deployment as stored in the ``fabric_agents`` bucket (key: the name)."""

    deployment: Deployment
    generation: NonNegInt = 1
    deleting: bool = False
    replicas: Annotated[list[ReplicaPlacement], msgspec.Meta(max_length=MAX_REPLICAS)] = []
    created_by: Annotated[str, msgspec.Meta(max_length=256)] = ""

    @property
    def name(self) -> str:
        return self.deployment.spec.name


class _Request(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    token: Token | None = None


class CreateDeployment(_Request):
    deployment: Deployment


class UpdateDeployment(_Request):
    deployment: Deployment


class ScaleDeployment(_Request):
    name: AgentId
    replicas: Replicas


class DeleteDeployment(_Request):
    name: AgentId


class GetDeployment(_Request):
    name: AgentId


class ListDeployments(_Request):
    pass


class NodeRequest(_Request):
    """Drain, cordon or uncordon one node (the method is in the subject)."""

    node_id: NodeId


API_METHODS: dict[str, type[_Request]] = {
    "create": CreateDeployment,
    "update": UpdateDeployment,
    "scale": ScaleDeployment,
    "delete": DeleteDeployment,
    "get": GetDeployment,
    "list": ListDeployments,
    "drain": NodeRequest,
    "cordon": NodeRequest,
    "uncordon": NodeRequest,
}


class ApiResult(
    msgspec.Struct,
    forbid_unknown_fields=True,
    frozen=True,
    kw_only=True,
    tag="result",
    tag_field="kind",
):
    """The reply to an API call that was carried out.

    ``changed`` is false when a mutation found the state already as asked
    (every mutation is idempotent).
    """

    method: Annotated[str, msgspec.Meta(max_length=32)]
    changed: bool = False
    deployments: Annotated[list[DeploymentRecord], msgspec.Meta(max_length=10_000)] = []
    node: NodeRecord | None = None
    message: Text = ""
