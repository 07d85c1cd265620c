"""Submitting tasks and reading their records: the SDK the CLI is built on.

::

    tasks = TaskClient(nc, submitted_by="op-1")
    sub = await tasks.submit("summarize", {"text": "..."})
    record = await tasks.wait(sub.task.id, within=30)

:meth:`TaskClient.submit` returns only once JetStream has stored the task
(its PubAck); the task id is the ``Nats-Msg-Id``, so submitting the same id
again within the duplicate window stores nothing and comes back with
``duplicate=True``. Bad input is refused before anything is sent, with a
:class:`~schemas.errors.ContractError` carrying its code: ``invalid_id`` (task
id or type), ``payload_too_large`` (the encoded task above
:data:`~schemas.task.MAX_TASK_PAYLOAD_BYTES`), ``invalid_payload`` (a payload
that is not JSON-encodable, a field out of range).

The submitter needs publish on ``tasks.*.queue`` and JetStream API access
(the operator role); reading records needs read access to the
``fabric_tasks`` bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from fabric.connect import js_publish
from fabric.tasks.records import TaskRecord, decode_record
from fabric.tasks.stream import RECORDS_BUCKET, TASKS_STREAM, direct_subject
from schemas import subjects
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.ids import validate_id
from schemas.task import MAX_TASK_PAYLOAD_BYTES, Task

__all__ = ["Submitted", "TaskClient", "make_task", "new_task_id"]

_encoder = msgspec.json.Encoder()


def new_task_id() -> str:
    """A fresh random task id (32 hex digits: a valid id)."""
    return uuid.uuid4().hex


def make_task(
    task_type: str,
    payload: Any = None,
    *,
    task_id: str | None = None,
    priority: int = 5,
    deadline: datetime | None = None,
    max_attempts: int = 3,
    submitted_by: str = "",
) -> tuple[Task, bytes]:
    """The task and its encoded bytes, checked as a dispatcher will check them."""
    validate_id(task_type, "task type")
    task_id = new_task_id() if task_id is None else validate_id(task_id, "task id")
    try:
        task = msgspec.convert(
            {
                "id": task_id,
                "type": task_type,
                "priority": priority,
                "max_attempts": max_attempts,
                "submitted_by": submitted_by,
            },
            Task,
        )
    except msgspec.ValidationError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, str(exc)) from None
    if deadline is not None and deadline.tzinfo is None:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, "deadline must carry a time zone")
    task = msgspec.structs.replace(task, payload=payload, deadline=deadline, submitted_at=utc_now())
    try:
        data = _encoder.encode(task)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ContractError(
            ErrorCode.INVALID_PAYLOAD, f"payload is not JSON-encodable: {exc}"
        ) from None
    if len(data) > MAX_TASK_PAYLOAD_BYTES:
        raise ContractError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"task is {len(data)} bytes encoded, the limit is {MAX_TASK_PAYLOAD_BYTES}",
        )
    return task, data


@dataclass(frozen=True, slots=True)
class Submitted:
    task: Task
    sequence: int
    """The task's sequence in stream TASKS (the first one's, for a duplicate)."""
    duplicate: bool
    """True: a task with this id was already stored within the duplicate window;
    this submission changed nothing and the task will run once."""


class TaskClient:
    """Submit, read and follow tasks over one NATS connection."""

    def __init__(self, nc: Client, *, submitted_by: str = "") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.submitted_by = submitted_by
        self._kv: KeyValue | None = None

    async def submit(
        self,
        task_type: str,
        payload: Any = None,
        *,
        task_id: str | None = None,
        priority: int = 5,
        deadline: datetime | None = None,
        max_attempts: int = 3,
        within: float = 30.0,
    ) -> Submitted:
        """Store one task in the queue; returns once JetStream acknowledged it."""
        task, data = make_task(
            task_type,
            payload,
            task_id=task_id,
            priority=priority,
            deadline=deadline,
            max_attempts=max_attempts,
            submitted_by=self.submitted_by,
        )
        ack = await js_publish(
            self.js,
            subjects.task_queue(task.type),
            data,
            msg_id=task.id,
            stream=TASKS_STREAM,
            deadline=within,
        )
        return Submitted(task=task, sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def send_direct(self, task_type: str, payload: Any = None) -> Task:
        """Fire and forget on ``tasks.<type>.direct`` (core NATS, at most once).

        Nothing is stored and nothing is retried: with no listener the task
        is simply gone, and no record or result is kept. For task types
        whose loss costs nothing (cache warm-ups, notifications).
        """
        task, data = make_task(task_type, payload, submitted_by=self.submitted_by)
        await self.nc.publish(direct_subject(task.type), data)
        return task

    async def records(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(RECORDS_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                raise ContractError(
                    ErrorCode.UNAVAILABLE, "no task records yet: is a controller running?"
                ) from None
        return self._kv

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; None when no dispatcher has seen it (yet)."""
        validate_id(task_id, "task id")
        kv = await self.records()
        try:
            entry = await kv.get(task_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return None if entry.value is None else decode_record(entry.value)

    async def wait(self, task_id: str, *, within: float | None = None) -> TaskRecord:
        """Follow the task's record until it is final (succeeded or dead).

        Raises ``ContractError(TIMEOUT)`` after ``within`` seconds (None: no limit).
        """
        validate_id(task_id, "task id")
        kv = await self.records()
        watcher = await kv.watch(task_id)
        try:
            async with asyncio.timeout(within):
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    record = decode_record(entry.value)
                    if record.final:
                        return record
        except TimeoutError:
            raise ContractError(
                ErrorCode.TIMEOUT, f"task {task_id!r} not finished within {within:g}s"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        raise ContractError(ErrorCode.UNAVAILABLE, "the record watch ended")

    async def run(
        self, task_type: str, payload: Any = None, *, within: float | None = None, **kw: Any
    ) -> TaskRecord:
        """Submit and wait: the final record."""
        submitted = await self.submit(task_type, payload, **kw)
        return await self.wait(submitted.task.id, within=within)
