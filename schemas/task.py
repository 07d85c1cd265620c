"""Tasks: submitted to ``tasks.<task_type>.queue``, handed to an agent on
``agents.<agent_id>.tasks``, answered with a :class:`TaskResult`.

The ``exec`` task type is run by the controller itself as a one-shot agent
(see :mod:`fabric.tasks.batch`): its payload is an :class:`ExecPayload`,
its result an :class:`ExecResult`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

from schemas.agent import Arg, EnvKey, EnvValue, Limits, Path
from schemas.common import Labels, Seconds, ShortText, Text, Timestamp
from schemas.ids import AgentId, NodeId, TaskId, TaskType

__all__ = [
    "EXEC_TASK_TYPE",
    "MAX_TASK_PAYLOAD_BYTES",
    "ExecConstraints",
    "ExecPayload",
    "ExecResult",
    "Task",
    "TaskAssignment",
    "TaskBatch",
    "TaskOutcome",
    "TaskProgress",
    "TaskResult",
    "TaskResults",
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


MAX_BATCH_ASSIGNMENTS = 256
"""The most assignments one :class:`TaskBatch` carries (and so the most replies a
worker may send to it: its ``allow_responses`` allowance)."""

BATCH_HEADER = "Fabric-Batch"
"""Header (value ``1``) marking a :class:`TaskBatch` on ``agents.<agent_id>.tasks``."""


class TaskBatch(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Several assignments in one message to ``agents.<agent_id>.tasks``, sent with
    the header ``Fabric-Batch: 1``. The worker answers every assignment exactly
    once, on the message's reply subject, in :class:`TaskResults` messages that
    carry the results finished together (so one slow task delays no other)."""

    assignments: Annotated[list[TaskAssignment], msgspec.Meta(min_length=1, max_length=256)]


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


class TaskResults(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A worker's answer to (part of) a :class:`TaskBatch`."""

    results: Annotated[list[TaskResult], msgspec.Meta(min_length=1, max_length=256)]


class TaskProgress(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A worker's progress report; it also extends the task's ack deadline."""

    task_id: TaskId
    agent_id: AgentId
    attempt: Annotated[int, msgspec.Meta(ge=1, le=100)]
    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    message: Text = ""
    at: Timestamp


EXEC_TASK_TYPE = "exec"
"""The task type a controller runs itself, as a one-shot agent."""

OutputLine = Annotated[str, msgspec.Meta(max_length=65536)]


class ExecConstraints(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Which nodes may run an ``exec`` task (as a deployment's constraints)."""

    labels: Labels = {}
    """Every label here must be on the node with this value."""
    capabilities: Annotated[list[TaskType], msgspec.Meta(max_length=64)] = []
    """Every capability here must be offered by the node."""


class ExecPayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The payload of an ``exec`` task: one command, run once, no shell."""

    argv: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=1024)]
    env: Annotated[dict[EnvKey, EnvValue], msgspec.Meta(max_length=512)] = {}
    cwd: Path | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)] = 3600.0
    """Seconds it may run once started; then it is stopped and the attempt fails."""
    stop_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    """Between SIGTERM and SIGKILL when it has to be stopped."""
    constraints: ExecConstraints = ExecConstraints()
    limits: Limits = Limits()
    tail: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 50
    """Lines of stdout and of stderr kept in the result."""


class ExecResult(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What became of an ``exec`` task's command (the task record's ``result``)."""

    exit_code: int | None = None
    signal: ShortText | None = None
    """The signal that ended it, when one did."""
    duration: Annotated[float, msgspec.Meta(ge=0)]
    """Seconds from spawn to exit, as the node saw them."""
    agent_id: AgentId
    node_id: NodeId
    stdout: Annotated[list[OutputLine], msgspec.Meta(max_length=1000)] = []
    stderr: Annotated[list[OutputLine], msgspec.Meta(max_length=1000)] = []
