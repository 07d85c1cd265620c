"""Tasks: submitted to ``tasks.<task_type>.queue``, handed to an agent on
``agents.<agent_id>.tasks``, answered with a :class:`TaskResult`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

from schemas.common import Seconds, ShortText, Text, Timestamp
from schemas.ids import AgentId, TaskId, TaskType

__all__ = [
    "MAX_TASK_PAYLOAD_BYTES",
    "Task",
    "TaskAssignment",
    "TaskOutcome",
    "TaskProgress",
    "TaskResult",
]

MAX_TASK_PAYLOAD_BYTES = 256 * 1024
"""The largest encoded task message accepted (payload included)."""


class Task(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A unit of work. ``id`` doubles as the JetStream ``Nats-Msg-Id`` for dedupe."""

    id: TaskId
    type: TaskType
    payload: Any = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 5
    deadline: Timestamp | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    submitted_by: ShortText = ""
    """Who submitted it. A controller replaces it with the subject of ``token``
    once verified; without a token it is the submitter's unchecked word."""
    submitted_at: Timestamp | None = None
    token: Annotated[str, msgspec.Meta(max_length=8192)] | None = None
    """A short-lived token with scope ``tasks:submit`` (fabric.tokens), checked by
    the controller that takes the task; never passed on to the worker."""
    retry: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    """0 for a first submission; n for an operator's n-th retry of a dead task
    (``fabric task dead retry``): its record is reset with a new attempt budget,
    and the message id is ``<id>.retry<n>`` so the duplicate window of the
    first submission does not swallow it."""


class TaskAssignment(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Sent by a controller to ``agents.<agent_id>.tasks`` (request/reply)."""

    task: Task
    attempt: Annotated[int, msgspec.Meta(ge=1, le=100)]
    ack_wait: Seconds
    token: Annotated[str, msgspec.Meta(max_length=8192)] | None = None


class TaskOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"


class TaskResult(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    task_id: TaskId
    agent_id: AgentId
    attempt: Annotated[int, msgspec.Meta(ge=1, le=100)]
    outcome: TaskOutcome
    result: Any = None
    error: Text | None = None
    started_at: Timestamp
    finished_at: Timestamp


class TaskProgress(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A worker's progress report; it also extends the task's ack deadline."""

    task_id: TaskId
    agent_id: AgentId
    attempt: Annotated[int, msgspec.Meta(ge=1, le=100)]
    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    message: Text = ""
    at: Timestamp
