"""Submitting tasks and reading their records: the SDK the CLI is built on.

::

    tasks = TaskClient(nc, submitted_by="op-1", issuer=issuer)
    sub = await tasks.submit("summarize", {"text": "..."})
    many = await tasks.submit_many(NewTask("summarize", {"text": t}) for t in texts)
    record = await tasks.wait(sub.task.id, within=30)
    waiting = await tasks.list_records(pending=True)
    letters = await tasks.dead()
    again = await tasks.retry(letters[0].task.id)

Every task carries a submit token (scope ``tasks:submit``): the controller
takes the submitter from it (:mod:`fabric.tasks.admission`), and a
controller run by ``fabric up`` refuses a task without one. ``submitted_by``
is only a fallback name for controllers that admit untokened tasks. Given
``issuer``, the client mints its tokens itself (:class:`SubmitTokens`): one
token for up to 1,000 tasks (its ``max_tasks`` claim), a fresh one once that
many are spent or half its lifetime has gone, so a controller verifies one
signature per thousand tasks instead of one per task. ``token`` instead is
called once per task and its token used as given.

:meth:`TaskClient.submit_many` submits many tasks with a bounded window of
publishes in flight (each still confirmed by its PubAck, each with its id as
``Nats-Msg-Id``) and returns each task's outcome in order: its
:class:`Submitted`, or the exception :meth:`~TaskClient.submit` would have
raised for it.

:meth:`TaskClient.submit` returns only once JetStream has stored the task
(its PubAck); the task id is the ``Nats-Msg-Id``, so submitting the same id
again within the duplicate window stores nothing and comes back with
``duplicate=True``. Bad input is refused before anything is sent, with a
:class:`~schemas.errors.ContractError` carrying its code: ``invalid_id`` (task
id or type), ``payload_too_large`` (the encoded task above
:data:`~schemas.task.MAX_TASK_PAYLOAD_BYTES`), ``invalid_payload`` (a payload
that is not JSON-encodable, a field out of range).

The submitter needs publish on ``tasks.*.queue`` and JetStream API access
(the operator role); reading records and dead letters uses short-lived
ephemeral pull consumers (no acks, no flow control) on ``KV_fabric_tasks``
and ``TASKS_DEAD``, which the operator's JetStream API right covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from fabric.connect import js_publish
from fabric.tasks.admission import SUBMIT_SCOPE
from fabric.tasks.pipe import StoredPublisher, Written
from fabric.tasks.records import DeadTask, TaskRecord, TaskState, decode_record
from fabric.tasks.stream import (
    DEAD_STREAM,
    DEAD_SUBJECTS,
    RECORDS_BUCKET,
    TASKS_STREAM,
    dead_subject,
    direct_subject,
)
from fabric.tokens import MAX_TASKS_PER_TOKEN, TokenIssuer
from schemas import subjects
from schemas.codec import decode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.ids import validate_id
from schemas.task import MAX_TASK_PAYLOAD_BYTES, Task

__all__ = [
    "DeadLetter",
    "NewTask",
    "SubmitTokens",
    "Submitted",
    "TaskClient",
    "make_task",
    "msg_id",
    "new_task_id",
]

_encoder = msgspec.json.Encoder()
TASKS_PER_TOKEN = 1000
TOKEN_TTL = 120.0
WINDOW = 256


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
    token: str | None = None,
    retry: int = 0,
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
                "token": token,
                "retry": retry,
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


def msg_id(task: Task) -> str:
    """The task's ``Nats-Msg-Id``: its id, or ``<id>.retry<n>`` for the n-th retry
    (a retry must not fall into the first submission's duplicate window)."""
    return task.id if not task.retry else f"{task.id}.retry{task.retry}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of stream ``TASKS_DEAD`` and the task's record now, if any."""

    sequence: int
    letter: DeadTask
    record: TaskRecord | None = None

    @property
    def task(self) -> Task:
        return self.letter.task

    @property
    def retried(self) -> bool:
        """Brought back by a retry that has not died again (queued, running or done)."""
        record = self.record
        return record is not None and record.retries > 0 and record.state is not TaskState.DEAD


@dataclass(frozen=True, slots=True)
class Submitted:
    task: Task
    sequence: int
    """The task's sequence in stream TASKS (the first one's, for a duplicate)."""
    duplicate: bool
    """True: a task with this id was already stored within the duplicate window;
    this submission changed nothing and the task will run once."""


@dataclass(frozen=True, slots=True)
class NewTask:
    """One task for :meth:`TaskClient.submit_many`: :meth:`TaskClient.submit`'s arguments."""

    type: str
    payload: Any = None
    id: str | None = None
    priority: int = 5
    deadline: datetime | None = None
    max_attempts: int = 3


class SubmitTokens:
    """Submit tokens minted from ``issuer``, each handed out for up to ``per_token``
    tasks (its ``max_tasks`` claim) and while more than half its ``ttl`` is left.

    Called once per task, as :class:`TaskClient` calls its ``token``. Half the
    lifetime leaves the other half for a submission to be stored, which is the
    moment the controller checks the token at. ``scopes``: add ``agents:run``
    for ``exec`` tasks (:func:`~fabric.tasks.admission.scopes_for`).
    """

    def __init__(
        self,
        issuer: TokenIssuer,
        subject: str,
        *,
        scopes: Sequence[str] = (SUBMIT_SCOPE,),
        per_token: int = TASKS_PER_TOKEN,
        ttl: float = TOKEN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= per_token <= MAX_TASKS_PER_TOKEN:
            raise ValueError(f"per_token must be 1 to {MAX_TASKS_PER_TOKEN}, not {per_token!r}")
        self._issuer = issuer
        self._subject = subject
        self._scopes = list(scopes)
        self._per_token = per_token
        self._ttl = ttl
        self._clock = clock
        self._token = ""
        self._left = 0
        self._renew_at = 0.0
        self.minted = 0
        """Tokens minted so far."""

    def __call__(self) -> str:
        now = self._clock()
        if self._left <= 0 or now >= self._renew_at:
            self._token = self._issuer.mint(
                self._subject, self._scopes, ttl=self._ttl, max_tasks=self._per_token
            )
            self.minted += 1
            self._left = self._per_token
            self._renew_at = now + self._ttl / 2
        self._left -= 1
        return self._token


class TaskClient:
    """Submit, read and follow tasks over one NATS connection."""

    def __init__(
        self,
        nc: Client,
        *,
        submitted_by: str = "",
        token: Callable[[], str] | None = None,
        issuer: TokenIssuer | None = None,
    ) -> None:
        """``token``: called once per task, its token used as given. ``issuer``: mint
        tokens here instead, for subject ``submitted_by``, each for many tasks
        (:class:`SubmitTokens`). Neither: tasks go without a token."""
        if issuer is not None:
            if token is not None:
                raise ValueError("give token or issuer, not both")
            if not submitted_by:
                raise ValueError("minting tokens needs submitted_by: it is their subject")
            token = SubmitTokens(issuer, submitted_by)
        self.nc = nc
        self.js = nc.jetstream()
        self.submitted_by = submitted_by
        self.token = token
        """The submit token for the next task (None: tasks go without one)."""
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
        retry: int = 0,
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
            token=self.token() if self.token is not None else None,
            retry=retry,
        )
        return await self._publish(task, data, within)

    async def submit_many(
        self, tasks: Iterable[NewTask], *, window: int = WINDOW, within: float = 30.0
    ) -> list[Submitted | Exception]:
        """Store many tasks, at most ``window`` publishes awaiting their PubAck at once.

        Each task's outcome, in the order given: its :class:`Submitted`, or the
        exception :meth:`submit` raises for it (ContractError for bad input,
        the publish's error once ``within`` seconds have passed). One task's
        failure does not stop the others.

        The publishes go out back to back with their PubAcks gathered on one
        subscription (:class:`~fabric.tasks.pipe.StoredPublisher`); a task whose
        first publish is not confirmed (a timeout, a server lost) is published
        again on its own, with the same ``Nats-Msg-Id``, until ``within``.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        outcomes: list[Submitted | Exception | None] = []
        made: list[tuple[int, Task, bytes]] = []
        for new in tasks:
            try:
                task, data = make_task(
                    new.type,
                    new.payload,
                    task_id=new.id,
                    priority=new.priority,
                    deadline=new.deadline,
                    max_attempts=new.max_attempts,
                    submitted_by=self.submitted_by,
                    token=self.token() if self.token is not None else None,
                )
            except Exception as exc:  # this task's outcome, as submit would raise it
                outcomes.append(exc)
                continue
            made.append((len(outcomes), task, data))
            outcomes.append(None)
        pipe = StoredPublisher(self.nc, timeout=min(within, 5.0))
        await pipe.start()
        try:
            for start in range(0, len(made), window):
                chunk = made[start : start + window]
                written = await pipe.write_many(
                    [
                        (subjects.task_queue(task.type), data, {"Nats-Msg-Id": msg_id(task)})
                        for _, task, data in chunk
                    ]
                )
                again: list[tuple[int, Task, bytes]] = []
                for (i, task, data), outcome in zip(chunk, written, strict=True):
                    if isinstance(outcome, Written):
                        outcomes[i] = Submitted(task, outcome.seq, outcome.duplicate)
                    else:
                        again.append((i, task, data))
                # Not confirmed or refused: on its own, retried as submit retries
                # it, so it ends as submit would end (stored, or submit's error).
                for i, task, data in again:
                    try:
                        outcomes[i] = await self._publish(task, data, within)
                    except Exception as exc:
                        outcomes[i] = exc
        finally:
            await pipe.stop()
        # Every slot was filled: made ones by their publish, the rest by their error.
        return cast(list[Submitted | Exception], outcomes)

    async def _publish(self, task: Task, data: bytes, within: float) -> Submitted:
        ack = await js_publish(
            self.js,
            subjects.task_queue(task.type),
            data,
            msg_id=msg_id(task),
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

    async def wait(
        self, task_id: str, *, within: float | None = None, retry: int = 0
    ) -> TaskRecord:
        """Follow the task's record until it is final (succeeded, dead or refused);
        with ``retry`` = n, the end of the run that retry n started.

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
                    if record.final and record.retries >= retry:
                        return record
        except TimeoutError:
            raise ContractError(
                ErrorCode.TIMEOUT, f"task {task_id!r} not finished within {within:g}s"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        raise ContractError(ErrorCode.UNAVAILABLE, "the record watch ended")

    async def list_records(
        self,
        *,
        task_type: str | None = None,
        state: TaskState | None = None,
        pending: bool = False,
        limit: int | None = None,
    ) -> list[TaskRecord]:
        """Task records, oldest submission first; ``limit`` keeps the newest.

        ``pending``: tasks not final and not running (queued or failed and
        waiting for a retry); their ``waiting`` says why.
        """
        if task_type is not None:
            validate_id(task_type, "task type")
        await self.records()  # a clear error when there is no bucket yet
        stream = f"KV_{RECORDS_BUCKET}"
        out: list[TaskRecord] = []
        for _, data in await _read(self.js, stream, f"$KV.{RECORDS_BUCKET}.>", last=True):
            if not data:
                continue  # a deleted or purged key
            try:
                record = decode_record(data)
            except ContractError:
                continue  # written by a newer fabric, or damaged: not this listing's job
            if task_type is not None and record.type != task_type:
                continue
            if state is not None and record.state is not state:
                continue
            if pending and (record.final or record.state is TaskState.RUNNING):
                continue
            out.append(record)
        out.sort(key=lambda r: (r.submitted_at or r.updated_at, r.id))
        return out[-limit:] if limit else out

    async def dead(self, task_type: str | None = None) -> list[DeadLetter]:
        """The dead letters (oldest first), one per task id (its latest), each with
        the task's current record."""
        subject = DEAD_SUBJECTS if task_type is None else dead_subject(task_type)
        letters: dict[str, DeadLetter] = {}
        for seq, data in await _read(self.js, DEAD_STREAM, subject, last=False):
            try:
                letter = decode(data, DeadTask, max_bytes=4 * MAX_TASK_PAYLOAD_BYTES)
            except ContractError:
                continue
            letters.pop(letter.task.id, None)  # a later letter of the same task wins
            letters[letter.task.id] = DeadLetter(seq, letter)
        if not letters:
            return []
        records = await asyncio.gather(*(self._get_quiet(i) for i in letters))
        return [
            DeadLetter(d.sequence, d.letter, record)
            for d, record in zip(letters.values(), records, strict=True)
        ]

    async def _get_quiet(self, task_id: str) -> TaskRecord | None:
        try:
            return await self.get(task_id)
        except ContractError:
            return None

    async def retry(self, task_id: str, *, within: float = 30.0) -> Submitted:
        """Submit a dead task again under its own id, with a new attempt budget.

        The letter stays in ``TASKS_DEAD`` (it is the payload's only copy
        until the retry is stored); the record says it was retried
        (``retries``) and :meth:`dead` marks it so. ContractError: NOT_FOUND
        (no dead letter for that id), INVALID_STATE (its record is not dead).
        """
        validate_id(task_id, "task id")
        record = await self._get_quiet(task_id)
        if record is not None and record.state is not TaskState.DEAD:
            raise ContractError(
                ErrorCode.INVALID_STATE,
                f"task {task_id!r} is {record.state.value}: only a dead task can be retried",
            )
        found = [
            d for d in await self.dead(record.type if record else None) if d.task.id == task_id
        ]
        if not found:
            raise ContractError(ErrorCode.NOT_FOUND, f"no dead letter for task {task_id!r}")
        task = found[-1].task
        deadline = task.deadline
        if deadline is not None and deadline <= utc_now():
            deadline = None  # it would die at once; a retry is a fresh start
        return await self.submit(
            task.type,
            task.payload,
            task_id=task.id,
            priority=task.priority,
            deadline=deadline,
            max_attempts=task.max_attempts,
            within=within,
            retry=(record.retries if record else 0) + 1,
        )

    async def run(
        self, task_type: str, payload: Any = None, *, within: float | None = None, **kw: Any
    ) -> TaskRecord:
        """Submit and wait: the final record."""
        submitted = await self.submit(task_type, payload, **kw)
        return await self.wait(submitted.task.id, within=within)


async def _read(
    js: Any, stream: str, subject: str, *, last: bool, batch: int = 512
) -> list[tuple[int, bytes]]:
    """Every message of ``stream`` on ``subject`` (only the last per subject with
    ``last``), read once through an ephemeral pull consumer without acks.

    Pull, not an ordered push consumer: a push consumer's flow control needs a
    publish right on ``$JS.FC.<stream>.>`` that operators do not hold.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if last else DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
    )
    try:
        psub = await js.pull_subscribe(subject, stream=stream, config=config)
    except nats.js.errors.NotFoundError:
        return []
    out: list[tuple[int, bytes]] = []
    name: str | None = None
    try:
        info = await psub.consumer_info()
        name = info.name
        want = info.num_pending or 0
        while len(out) < want:
            try:
                msgs = await psub.fetch(min(batch, want - len(out)), timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                break  # messages removed meanwhile (expired, deleted): what came is all
            for msg in msgs:
                out.append((msg.metadata.sequence.stream, bytes(msg.data)))
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)
    return out
