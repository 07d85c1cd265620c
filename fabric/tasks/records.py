"""Task records: what the ``fabric_tasks`` KV bucket says about each task.

One record per task id, written only by dispatchers (controllers), read by
``fabric task get`` and followed by ``fabric task submit --wait``. The
transitions are pure functions over the record; :class:`RecordStore` does
the compare-and-set writes.

States::

                 ┌───────────── handed back / agent gone before it ran ─────────┐
                 ▼                                                              │
    (stored) ─▶ queued ──▶ running ──▶ succeeded                                │
       │         │  ▲         │  │                                              │
       │         │  │         │  └──▶ failed ──(backoff, redelivered)──▶ running ┘
       │         │  └─────────┘           │
       ▼         ▼                        ▼
    refused     dead ◀──── max_attempts spent, deadline passed, or given up
  (not admitted) │
                 └──── fabric task dead retry ───▶ queued (attempts 0, retries + 1)

A task the controller does not admit (a bad, expired or missing submit
token: :mod:`fabric.tasks.admission`) is recorded ``refused`` with its error
code and never runs. ``fabric task dead retry`` brings a ``dead`` task back to
``queued`` with a fresh attempt budget (``retries`` counts how often).

``succeeded``, ``dead`` and ``refused`` are final for dispatchers: such a
record never changes again (only an operator's retry reopens a dead one),
so a redelivered message whose record is final is acknowledged without
running it a second time. ``failed`` means the last attempt failed and the
task waits for its retry. ``attempts`` counts handler runs that ended
(success, failure, or the agent lost while running it); a task handed back by
a draining worker or never sent to any agent does not use an attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from schemas.common import ShortText, Text, Timestamp, utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.ids import AgentId, NodeId, TaskId, TaskType
from schemas.task import Task, TaskResult

__all__ = [
    "FINAL_STATES",
    "DeadTask",
    "RecordStore",
    "TaskRecord",
    "TaskState",
    "after_failure",
    "handed_back",
    "new_record",
    "refused",
    "revived",
    "started",
    "succeeded",
    "transition",
    "waiting",
    "went_dead",
    "with_progress",
]

log = logging.getLogger(__name__)

_MAX_RECORD_BYTES = 1024 * 1024


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    REFUSED = "refused"


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.REFUSED})

_ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset(
        {TaskState.QUEUED, TaskState.RUNNING, TaskState.DEAD, TaskState.REFUSED}
    ),
    TaskState.RUNNING: frozenset(
        {
            TaskState.RUNNING,  # redelivered after a dispatcher died: a new attempt
            TaskState.QUEUED,
            TaskState.SUCCEEDED,
            TaskState.FAILED,
            TaskState.DEAD,
        }
    ),
    TaskState.FAILED: frozenset(
        {TaskState.FAILED, TaskState.QUEUED, TaskState.RUNNING, TaskState.DEAD}
    ),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.DEAD: frozenset(),
    TaskState.REFUSED: frozenset(),
}

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class TaskRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One task as the fabric knows it (KV key: the task id)."""

    id: TaskId
    type: TaskType
    state: TaskState
    attempts: NonNegInt = 0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)]
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 5
    submitted_by: ShortText = ""
    submitted_at: Timestamp | None = None
    deadline: Timestamp | None = None
    updated_at: Timestamp
    agent_id: AgentId | None = None
    """The agent that ran (or runs) the latest attempt."""
    node_id: NodeId | None = None
    started_at: Timestamp | None = None
    """When the latest attempt was sent to its agent."""
    finished_at: Timestamp | None = None
    result: Any = None
    error: Text | None = None
    """The latest attempt's error, kept after a later success is not reached."""
    progress: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    progress_message: Text = ""
    waiting: Text = ""
    """Why a queued task is not running (no capable agent, limit reached)."""
    dispatcher: ShortText = ""
    """The controller that wrote this record last."""
    code: ErrorCode | None = None
    """Why a ``refused`` task was not admitted (e.g. ``token_expired``)."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    """How many times an operator brought this task back from the dead letters."""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def transition(record: TaskRecord, state: TaskState, **changes: Any) -> TaskRecord:
    """``record`` moved to ``state`` with ``changes``; ContractError(INVALID_STATE) if
    the state machine forbids it."""
    if state not in _ALLOWED[record.state]:
        raise ContractError(
            ErrorCode.INVALID_STATE,
            f"task {record.id!r} cannot go from {record.state.value} to {state.value}",
        )
    return msgspec.structs.replace(record, state=state, updated_at=utc_now(), **changes)


def new_record(task: Task, dispatcher: str = "") -> TaskRecord:
    return TaskRecord(
        id=task.id,
        type=task.type,
        state=TaskState.QUEUED,
        max_attempts=task.max_attempts,
        priority=task.priority,
        submitted_by=task.submitted_by,
        submitted_at=task.submitted_at,
        deadline=task.deadline,
        updated_at=utc_now(),
        dispatcher=dispatcher,
    )


def refused(record: TaskRecord, code: ErrorCode, error: str) -> TaskRecord:
    """Not admitted (:mod:`fabric.tasks.admission`): final, it never runs."""
    return transition(
        record, TaskState.REFUSED, code=code, error=error[:4096], finished_at=utc_now()
    )


def revived(record: TaskRecord, task: Task) -> TaskRecord:
    """A dead task retried by an operator (``task.retry``): queued again with a new
    attempt budget, submitted by whoever retried it. Done outside :func:`transition`
    on purpose: ``dead`` is final for dispatchers, and only a retry may reopen it."""
    return msgspec.structs.replace(
        record,
        state=TaskState.QUEUED,
        attempts=0,
        max_attempts=task.max_attempts,
        priority=task.priority,
        submitted_by=task.submitted_by,
        submitted_at=task.submitted_at,
        deadline=task.deadline,
        updated_at=utc_now(),
        agent_id=None,
        node_id=None,
        started_at=None,
        finished_at=None,
        result=None,
        error=None,
        code=None,
        progress=None,
        progress_message="",
        waiting="",
        retries=task.retry,
    )


def waiting(record: TaskRecord, reason: str) -> TaskRecord:
    """Still queued, and why (``fabric task get`` shows it)."""
    state = TaskState.QUEUED if record.state is TaskState.RUNNING else record.state
    return transition(record, state, waiting=reason[:4096])


def started(record: TaskRecord, agent_id: str, node_id: str | None, dispatcher: str) -> TaskRecord:
    return transition(
        record,
        TaskState.RUNNING,
        agent_id=agent_id,
        node_id=node_id,
        started_at=utc_now(),
        finished_at=None,
        progress=None,
        progress_message="",
        waiting="",
        dispatcher=dispatcher,
    )


def succeeded(record: TaskRecord, result: TaskResult) -> TaskRecord:
    return transition(
        record,
        TaskState.SUCCEEDED,
        attempts=max(record.attempts, result.attempt),
        result=result.result,
        finished_at=result.finished_at,
        progress=1.0,
    )


def after_failure(record: TaskRecord, attempt: int, error: str) -> tuple[TaskRecord, bool]:
    """A failed (or lost) attempt: the record in ``failed``, and whether no attempt is left.

    The caller dead-letters the task when the flag is set (copy first, then
    :func:`went_dead`), else naks it for a retry.
    """
    attempts = max(record.attempts, attempt)
    failed = transition(
        record, TaskState.FAILED, attempts=attempts, error=error[:4096], finished_at=utc_now()
    )
    return failed, attempts >= record.max_attempts


def went_dead(record: TaskRecord, error: str) -> TaskRecord:
    return transition(record, TaskState.DEAD, error=error[:4096], finished_at=utc_now())


def handed_back(record: TaskRecord, reason: str) -> TaskRecord:
    """Back to the queue without using an attempt (worker draining, agent gone before it ran)."""
    return transition(record, TaskState.QUEUED, waiting=reason[:4096])


def with_progress(record: TaskRecord, fraction: float | None, message: str) -> TaskRecord:
    if record.state is not TaskState.RUNNING:
        return record
    return msgspec.structs.replace(
        record,
        progress=fraction if fraction is not None else record.progress,
        progress_message=message[:4096],
        updated_at=utc_now(),
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TaskRecord)


class DeadTask(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A task that spent its attempts, as stored on ``tasks.<type>.dead``."""

    task: Task
    error: Text
    attempts: NonNegInt
    agent_id: AgentId | None = None
    node_id: NodeId | None = None
    dead_at: Timestamp
    dispatcher: ShortText = ""


def encode_record(record: TaskRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> TaskRecord:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, f"bad task record: {exc}") from None


@dataclass(slots=True)
class Stored:
    """A record and the KV revision it was read or written at."""

    record: TaskRecord
    revision: int
    applied: bool = True
    """False when a save found the record final and left it as it was."""


class RecordStore:
    """Compare-and-set access to the ``fabric_tasks`` bucket.

    Several dispatchers may hold the same task (a redelivery after one of
    them stalled past the ack wait), so every write names the revision it
    read; on a conflict the change is applied again to the newer record.
    A final record is never overwritten.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, task_id: str) -> Stored | None:
        try:
            entry = await self.kv.get(task_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Stored(decode_record(entry.value), entry.revision)

    async def claim(
        self,
        task: Task,
        dispatcher: str,
        first: Callable[[TaskRecord], TaskRecord] | None = None,
    ) -> tuple[Stored, bool]:
        """The task's record and whether this call created it.

        With no record yet, one is created: ``queued``, or ``first(queued)``
        (e.g. already ``running`` on the agent chosen), in one write.
        """
        record = new_record(task, dispatcher)
        if first is not None:
            record = first(record)
        try:
            revision = await self.kv.create(task.id, encode_record(record))
            return Stored(record, revision), True
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        found = await self.get(task.id)
        if found is None:
            # Deleted in between (an operator purged it): start over once.
            revision = await self.kv.put(task.id, encode_record(record))
            return Stored(record, revision), True
        return found, False

    async def save(
        self, current: Stored, change: Callable[[TaskRecord], TaskRecord], *, tries: int = 5
    ) -> Stored:
        """Apply ``change`` to ``current`` and write it at ``current.revision``.

        On a conflict, re-read and apply ``change`` to what is stored, unless
        that is final (returned as it is). ``change`` may raise ContractError
        (an impossible transition), which is passed on.
        """
        stored = current
        for _ in range(tries):
            if stored.record.final:
                return Stored(stored.record, stored.revision, applied=False)
            record = change(stored.record)
            data = encode_record(record)
            if len(data) > _MAX_RECORD_BYTES:
                raise ContractError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"task record is {len(data)} bytes, the limit is {_MAX_RECORD_BYTES}",
                )
            try:
                revision = await self.kv.update(record.id, data, last=stored.revision)
                return Stored(record, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                fresh = await self.get(record.id)
                if fresh is None:
                    raise ContractError(
                        ErrorCode.NOT_FOUND, f"task record {record.id!r} vanished"
                    ) from None
                stored = fresh
        raise ContractError(ErrorCode.CONFLICT, f"task record {current.record.id!r} keeps changing")


# nats errors a store call may raise besides ContractError; callers catch these.
STORE_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError)
