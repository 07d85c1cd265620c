"""The whole wire contract as data: every message type and every channel.

The generator (``python -m schemas.generate``) turns this into
``schemas/json/*.schema.json`` and ``schemas/asyncapi.yaml``; tests check that
every subject in the design has a channel here and that the files are fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.agent import AgentSpec, AgentStatus
from schemas.command import AgentCommand, CommandResult, NodeCommand
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ErrorReply
from schemas.event import CloudEvent
from schemas.logs import LogBatch
from schemas.node import NodeHeartbeat, RegisterReply, RegisterRequest
from schemas.subjects import Family
from schemas.task import Task, TaskAssignment, TaskProgress, TaskResult

__all__ = ["CHANNELS", "MESSAGES", "Channel"]

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
    "TaskProgress": TaskProgress,
    "CloudEvent": CloudEvent,
    "DiscoverRequest": DiscoverRequest,
    "DiscoverReply": DiscoverReply,
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
        "A task handed to a worker inside the agent (request/reply).",
        ("controller",),
        "TaskAssignment",
        ("TaskResult", "ErrorReply"),
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
        "Task submission into the JetStream TASKS stream (Nats-Msg-Id = task id).",
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
        "Find nodes and agents; answered by controllers from the registry.",
        ("operator", "viewer", "node"),
        "DiscoverRequest",
        ("DiscoverReply", "ErrorReply"),
    ),
)
