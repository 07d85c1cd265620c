"""The whole wire contract as data: every message type and every channel.

The generator (``python -m schemas.generate``) turns this into
``schemas/json/*.schema.json`` and ``schemas/asyncapi.yaml``; tests check that
every subject in the design has a channel here and that the files are fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.agent import AgentSpec, AgentStatus
from schemas.api import (
    API_METHODS,
    ApiResult,
    CreateDeployment,
    DeleteDeployment,
    GetDeployment,
    ListDeployments,
    NodeRequest,
    ScaleDeployment,
    UpdateDeployment,
)
from schemas.command import AgentCommand, CommandResult, NodeCommand
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ErrorReply
from schemas.event import CloudEvent
from schemas.logs import LogBatch
from schemas.node import NodeHeartbeat, RegisterReply, RegisterRequest
from schemas.subjects import Family
from schemas.task import (
    ExecPayload,
    ExecResult,
    Task,
    TaskAssignment,
    TaskBatch,
    TaskProgress,
    TaskResult,
    TaskResults,
)

__all__ = ["CHANNELS", "MESSAGES", "ApiRequest", "Channel"]


def _api_request() -> type[msgspec.Struct]:
    """Every field any ``fabric.api.<method>`` request has, each optional.

    Built from the request types themselves, so it cannot drift from them:
    a channel names one message, and the API's requests are untagged (the
    method is in the subject), so no union of them can stand for the channel.
    """
    fields: dict[str, Any] = {}
    for type_ in API_METHODS.values():
        for field in msgspec.structs.fields(type_):
            fields.setdefault(field.name, field.type)
    methods = "; ".join(f"{m}: {t.__name__}" for m, t in API_METHODS.items())
    return msgspec.defstruct(
        "ApiRequest",
        [(name, type_ | None, None) for name, type_ in sorted(fields.items())],
        kw_only=True,
        omit_defaults=True,
        forbid_unknown_fields=True,
        frozen=True,
        module=__name__,
        namespace={
            "__doc__": (
                "A request on fabric.api.<method>: the fields of that method's own request"
                f" type ({methods}), which the controller checks."
            )
        },
    )


ApiRequest = _api_request()

MESSAGES: dict[str, Any] = {
    "AgentSpec": AgentSpec,
    "AgentStatus": AgentStatus,
    "AgentCommand": AgentCommand,
    "NodeCommand": NodeCommand,
    "CommandResult": CommandResult,
    "ErrorReply": ErrorReply,
    "NodeHeartbeat": NodeHeartbeat,
    "RegisterRequest": RegisterRequest,
    "RegisterReply": RegisterReply,
    "LogBatch": LogBatch,
    "Task": Task,
    "TaskAssignment": TaskAssignment,
    "TaskResult": TaskResult,
    "TaskBatch": TaskBatch,
    "TaskResults": TaskResults,
    "TaskProgress": TaskProgress,
    "ExecPayload": ExecPayload,
    "ExecResult": ExecResult,
    "CloudEvent": CloudEvent,
    "DiscoverRequest": DiscoverRequest,
    "DiscoverReply": DiscoverReply,
    "ApiRequest": ApiRequest,
    "CreateDeployment": CreateDeployment,
    "UpdateDeployment": UpdateDeployment,
    "ScaleDeployment": ScaleDeployment,
    "DeleteDeployment": DeleteDeployment,
    "GetDeployment": GetDeployment,
    "ListDeployments": ListDeployments,
    "NodeRequest": NodeRequest,
    "ApiResult": ApiResult,
}


@dataclass(frozen=True)
class Channel:
    family: Family
    address: str
    """AsyncAPI address template, e.g. ``agents.{agent_id}.status``."""
    description: str
    publishers: tuple[str, ...]
    message: str
    reply: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    """Other messages sent on the channel instead of ``message``, told apart by a
    header that ``description`` names."""


CHANNELS: tuple[Channel, ...] = (
    Channel(
        Family.AGENT_COMMANDS,
        "agents.{agent_id}.commands",
        "Commands for one agent, answered by the node agent hosting it.",
        ("operator", "controller"),
        "AgentCommand",
        ("CommandResult", "ErrorReply"),
    ),
    Channel(
        Family.AGENT_STATUS,
        "agents.{agent_id}.status",
        "The agent's status, on every transition and every metrics tick.",
        ("node",),
        "AgentStatus",
    ),
    Channel(
        Family.AGENT_LOGS,
        "agents.{agent_id}.logs",
        "Batched stdout/stderr lines, while someone follows them or when configured.",
        ("node",),
        "LogBatch",
    ),
    Channel(
        Family.AGENT_TASKS,
        "agents.{agent_id}.tasks",
        "A task handed to a worker inside the agent (request/reply), answered with a"
        " TaskResult. With the header Fabric-Batch: 1 the body is a TaskBatch of up to 256"
        " assignments instead, each answered exactly once (a repeated task id and attempt"
        " once) on the reply subject in TaskResults messages that carry the results"
        " finished together, so several replies come to the one request. A body that does"
        " not decode gets one ErrorReply.",
        ("controller",),
        "TaskAssignment",
        ("TaskResult", "TaskResults", "ErrorReply"),
        variants=("TaskBatch",),
    ),
    Channel(
        Family.NODE_COMMANDS,
        "nodes.{node_id}.commands",
        "Place, remove and list agents; drain or shut down the node.",
        ("controller", "operator"),
        "NodeCommand",
        ("CommandResult", "ErrorReply"),
    ),
    Channel(
        Family.NODE_HEARTBEAT,
        "nodes.{node_id}.heartbeat",
        "The node agent's heartbeat, every heartbeat_interval.",
        ("node",),
        "NodeHeartbeat",
    ),
    Channel(
        Family.NODE_REGISTER,
        "nodes.{node_id}.register",
        "Registration; the subject proves the sender. Controllers answer in one queue group.",
        ("node",),
        "RegisterRequest",
        ("RegisterReply", "ErrorReply"),
    ),
    Channel(
        Family.TASK_QUEUE,
        "tasks.{task_type}.queue",
        "Task submission into the JetStream TASKS stream (Nats-Msg-Id = task id, or"
        " <id>.retry<n> for an operator's n-th retry of a dead task). The task carries a"
        " token with scope tasks:submit; a controller that requires one refuses a task"
        " without a valid one (record state refused, with the code) and never runs it.",
        ("operator", "controller"),
        "Task",
    ),
    Channel(
        Family.EVENT,
        "events.{kind}",
        "CloudEvents 1.0 JSON events, stored in the EVENTS stream.",
        ("node", "controller"),
        "CloudEvent",
    ),
    Channel(
        Family.DISCOVER,
        "fabric.discover",
        "Find nodes and agents (answered by controllers from the registry), or the task"
        " backlog per type (what=tasks: from stream TASKS and the task records).",
        ("operator", "viewer", "node"),
        "DiscoverRequest",
        ("DiscoverReply", "ErrorReply"),
    ),
    Channel(
        Family.API,
        "fabric.api.{method}",
        "The operator API, answered by controllers in one queue group. The body is the"
        " method's request type (create, update: CreateDeployment, UpdateDeployment;"
        " scale: ScaleDeployment; delete: DeleteDeployment; get: GetDeployment;"
        " list: ListDeployments; drain, cordon, uncordon: NodeRequest), with a token"
        " holding the method's scope. Every mutation is idempotent.",
        ("operator",),
        "ApiRequest",
        ("ApiResult", "ErrorReply"),
    ),
)
