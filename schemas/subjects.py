"""Every NATS subject the fabric uses: one builder and one parser for each.

Builders validate every id they are given, so no unchecked string ever
becomes part of a subject. :func:`parse_subject` turns a concrete subject back
into a :class:`Subject`, refusing anything that is not in the table.

===========================  ========================================
subject                      family
===========================  ========================================
agents.<agent_id>.commands   ``agent_commands``
agents.<agent_id>.status     ``agent_status``
agents.<agent_id>.logs       ``agent_logs``
agents.<agent_id>.tasks      ``agent_tasks``
nodes.<node_id>.commands     ``node_commands``
nodes.<node_id>.heartbeat    ``node_heartbeat``
nodes.<node_id>.register     ``node_register``
tasks.<task_type>.queue      ``task_queue``
events.<kind>                ``event`` (kind: ``agent.exited`` ...)
fabric.discover              ``discover``
fabric.api.<method>          ``api``
===========================  ========================================
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from schemas.errors import ContractError, ErrorCode
from schemas.ids import EVENT_KIND_PATTERN, validate_id

__all__ = [
    "ALL_AGENT_STATUS",
    "ALL_EVENTS",
    "ALL_HEARTBEATS",
    "DISCOVER",
    "TASK_QUEUES",
    "Family",
    "Subject",
    "agent_commands",
    "agent_logs",
    "agent_status",
    "agent_tasks",
    "api",
    "event",
    "node_commands",
    "node_heartbeat",
    "node_register",
    "parse_subject",
    "task_queue",
]

_KIND_RE = re.compile(EVENT_KIND_PATTERN)
_MAX_SUBJECT = 256

DISCOVER = "fabric.discover"
# Wildcards for listeners; never built from input.
ALL_AGENT_STATUS = "agents.*.status"
ALL_AGENT_LOGS = "agents.*.logs"
ALL_HEARTBEATS = "nodes.*.heartbeat"
ALL_REGISTRATIONS = "nodes.*.register"
ALL_EVENTS = "events.>"
TASK_QUEUES = "tasks.*.queue"
API_PREFIX = "fabric.api"


class Family(StrEnum):
    AGENT_COMMANDS = "agent_commands"
    AGENT_STATUS = "agent_status"
    AGENT_LOGS = "agent_logs"
    AGENT_TASKS = "agent_tasks"
    NODE_COMMANDS = "node_commands"
    NODE_HEARTBEAT = "node_heartbeat"
    NODE_REGISTER = "node_register"
    TASK_QUEUE = "task_queue"
    EVENT = "event"
    DISCOVER = "discover"
    API = "api"


class Subject(NamedTuple):
    family: Family
    id: str | None = None
    """The agent id, node id, task type, event kind or API method."""


_AGENT_LEAVES = {
    "commands": Family.AGENT_COMMANDS,
    "status": Family.AGENT_STATUS,
    "logs": Family.AGENT_LOGS,
    "tasks": Family.AGENT_TASKS,
}
_NODE_LEAVES = {
    "commands": Family.NODE_COMMANDS,
    "heartbeat": Family.NODE_HEARTBEAT,
    "register": Family.NODE_REGISTER,
}


def agent_commands(agent_id: str) -> str:
    return f"agents.{validate_id(agent_id, 'agent id')}.commands"


def agent_status(agent_id: str) -> str:
    return f"agents.{validate_id(agent_id, 'agent id')}.status"


def agent_logs(agent_id: str) -> str:
    return f"agents.{validate_id(agent_id, 'agent id')}.logs"


def agent_tasks(agent_id: str) -> str:
    return f"agents.{validate_id(agent_id, 'agent id')}.tasks"


def node_commands(node_id: str) -> str:
    return f"nodes.{validate_id(node_id, 'node id')}.commands"


def node_heartbeat(node_id: str) -> str:
    return f"nodes.{validate_id(node_id, 'node id')}.heartbeat"


def node_register(node_id: str) -> str:
    return f"nodes.{validate_id(node_id, 'node id')}.register"


def task_queue(task_type: str) -> str:
    return f"tasks.{validate_id(task_type, 'task type')}.queue"


def event(kind: str) -> str:
    """``events.<kind>``, where kind is e.g. ``agent.exited`` (2 or 3 id-shaped tokens)."""
    if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None:
        raise ContractError(ErrorCode.INVALID_ID, f"invalid event kind {kind!r}")
    return f"events.{kind}"


def api(method: str) -> str:
    return f"{API_PREFIX}.{validate_id(method, 'api method')}"


def _bad(subject: str) -> ContractError:
    shown = subject if len(subject) <= 80 else subject[:77] + "..."
    return ContractError(ErrorCode.INVALID_ID, f"not a fabric subject: {shown!r}")


def parse_subject(subject: str) -> Subject:
    """Classify a concrete subject; raise ``ContractError(INVALID_ID)`` for anything else."""
    if not isinstance(subject, str) or len(subject) > _MAX_SUBJECT:
        raise _bad(str(subject))
    tokens = subject.split(".")
    head = tokens[0]
    try:
        if head == "agents" and len(tokens) == 3 and tokens[2] in _AGENT_LEAVES:
            return Subject(_AGENT_LEAVES[tokens[2]], validate_id(tokens[1], "agent id"))
        if head == "nodes" and len(tokens) == 3 and tokens[2] in _NODE_LEAVES:
            return Subject(_NODE_LEAVES[tokens[2]], validate_id(tokens[1], "node id"))
        if head == "tasks" and len(tokens) == 3 and tokens[2] == "queue":
            return Subject(Family.TASK_QUEUE, validate_id(tokens[1], "task type"))
    except ContractError:
        raise _bad(subject) from None
    if head == "events" and len(tokens) >= 2:
        kind = subject.removeprefix("events.")
        if _KIND_RE.fullmatch(kind):
            return Subject(Family.EVENT, kind)
    if subject == DISCOVER:
        return Subject(Family.DISCOVER)
    if subject.startswith(API_PREFIX + ".") and len(tokens) == 3:
        try:
            return Subject(Family.API, validate_id(tokens[2], "api method"))
        except ContractError:
            raise _bad(subject) from None
    raise _bad(subject)
