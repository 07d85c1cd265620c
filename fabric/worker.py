"""The worker SDK: code running inside an agent that serves task types.

::

    from fabric.worker import Worker

    worker = Worker()

    @worker.task("summarize", concurrency=4)
    async def summarize(ctx, payload):
        await ctx.progress(0.5, "halfway")
        return {"summary": payload["text"][:100]}

    if __name__ == "__main__":
        worker.main()           # or: asyncio.run(worker.run())

Everything comes from the environment the node agent gives every agent:
``FABRIC_AGENT_ID``, ``FABRIC_NATS_URL``, ``FABRIC_CA``, ``FABRIC_CERT`` and
``FABRIC_KEY`` (a worker identity). The agent's spec must list the task types
it serves in ``capabilities`` so controllers send it those tasks.

What the worker does:

* subscribes ``agents.<agent_id>.tasks``; each :class:`TaskAssignment` is run
  by its type's handler, at most ``concurrency`` at once per handler (more
  wait their turn), and answered with a :class:`TaskResult`: ``succeeded``
  with the handler's return value (JSON-encodable), ``failed`` with the
  exception's text when it raises;
* while it holds an assignment it publishes :class:`TaskProgress` on
  ``events.task.progress`` at least every ``ack_wait / 3`` seconds (a
  keepalive; :meth:`TaskContext.progress` sends a real one), which keeps
  the task's JetStream ack deadline alive and tells the dispatcher it lives;
* a message with the header ``Fabric-Batch: 1`` carries a :class:`TaskBatch`:
  each of its assignments is served as if it had come alone (a repeated
  ``(task_id, attempt)`` is served once), and the results go to the message's
  reply subject in :class:`TaskResults` messages, one for all the results
  finished in the same event-loop turn (split at 256 results or
  ``MAX_RESULTS_BYTES``), so a slow task holds back no other. A body that does
  not decode gets one :class:`ErrorReply`;
* a handler declared with ``direct=True`` also takes fire-and-forget tasks
  from ``tasks.<type>.direct`` (core NATS, one worker of the queue group
  each): **at most once**, never stored, never retried, no record; lost if
  no worker listens or the worker dies. Needs the worker role to subscribe
  ``tasks.*.direct`` and senders to publish there;
* on SIGTERM or SIGINT it drains: stops taking assignments, lets running
  handlers finish within ``grace`` seconds, and hands back the rest (and any
  still waiting for a slot) with outcome ``retry``, which does not use one of
  the task's attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from fabric.connect import connect
from fabric.tasks.stream import direct_subject
from schemas import subjects
from schemas.codec import DEFAULT_MAX_BYTES, decode, encode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode
from schemas.event import make_event
from schemas.ids import validate_id
from schemas.task import (
    BATCH_HEADER,
    MAX_BATCH_ASSIGNMENTS,
    MAX_TASK_PAYLOAD_BYTES,
    Task,
    TaskAssignment,
    TaskBatch,
    TaskOutcome,
    TaskProgress,
    TaskResult,
    TaskResults,
)

__all__ = [
    "ENV_AGENT_ID",
    "MAX_BATCH_BYTES",
    "MAX_RESULTS_BYTES",
    "MAX_RESULT_BYTES",
    "Handler",
    "TaskContext",
    "Worker",
]

log = logging.getLogger(__name__)

ENV_AGENT_ID = "FABRIC_AGENT_ID"
PROGRESS_SUBJECT = "events.task.progress"
MAX_RESULT_BYTES = MAX_TASK_PAYLOAD_BYTES
"""The largest encoded result a handler may return; a larger one fails the attempt."""
MAX_BATCH_BYTES = DEFAULT_MAX_BYTES
"""The largest encoded :class:`TaskBatch` accepted (the server's default max_payload)."""
MAX_RESULTS_BYTES = 512 * 1024
"""The most one :class:`TaskResults` message carries, encoded; more results are split."""
# TaskResults around its results: the results' own bytes plus this and a comma each.
_RESULTS_FRAME = len(b'{"results":[]}')
_MAX_ASSIGNMENT = MAX_TASK_PAYLOAD_BYTES + 16 * 1024
_MAX_ERROR = 4096
_NO_KEEPALIVE = 7 * 24 * 3600.0
DIRECT_QUEUE = "fabric-direct"
_HANDED_BACK = "worker draining: handed back"

Handler = Callable[["TaskContext", Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


class TaskContext:
    """What a handler knows about the task it runs, and how it reports progress."""

    def __init__(self, worker: Worker, assignment: TaskAssignment, held: _Held) -> None:
        self._worker = worker
        self._held = held
        self.task: Task = assignment.task
        self.attempt: int = assignment.attempt
        self.agent_id: str = worker.agent_id

    @property
    def task_id(self) -> str:
        return self.task.id

    async def progress(self, fraction: float | None = None, message: str = "") -> None:
        """Report progress (0.0 to 1.0 and/or a line of text); it is kept in the task record
        and extends the task's deadline. Never raises for a lost connection."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be between 0 and 1, not {fraction}")
        await self._worker._report(self._held, fraction, message[:_MAX_ERROR])


@dataclass(slots=True)
class _Route:
    handler: Handler
    concurrency: int
    slots: asyncio.Semaphore
    direct: bool = False


@dataclass(slots=True)
class _Held:
    """One assignment this worker holds, waiting for a slot or running."""

    msg: Msg
    assignment: TaskAssignment
    last_report: float
    runner: asyncio.Task[Any] | None = None
    running: bool = False
    direct: bool = False
    """Came on ``tasks.<type>.direct``: no keepalive, a reply only if one was asked."""
    batch: _Batch | None = None
    """Came in a :class:`TaskBatch`: answered with the batch's other results."""
    started_at: Any = field(default_factory=utc_now)


@dataclass(slots=True)
class _Batch:
    """The reply side of one :class:`TaskBatch`: results waiting for the end of the
    event-loop turn they finished in, to go out together."""

    msg: Msg
    tg: asyncio.TaskGroup
    pending: list[tuple[TaskResult, int]] = field(default_factory=list)
    """Results not sent yet, with their encoded sizes; non-empty means a flush is due."""


class Worker:
    """Serves task types for one agent; see the module docstring."""

    def __init__(
        self,
        agent_id: str | None = None,
        *,
        grace: float = 5.0,
        nc: Client | None = None,
    ) -> None:
        """``agent_id`` defaults to ``FABRIC_AGENT_ID``; ``nc`` (for tests and embedding)
        is an open connection to use instead of connecting from the environment."""
        raw = agent_id if agent_id is not None else os.environ.get(ENV_AGENT_ID)
        if not raw:
            raise RuntimeError(f"no agent id: set {ENV_AGENT_ID} (the node agent does)")
        self.agent_id = validate_id(raw, "agent id")
        self.grace = grace
        self.nc = nc
        self._routes: dict[str, _Route] = {}
        self._held: dict[tuple[str, int], _Held] = {}
        self._stop = asyncio.Event()
        self._draining = False
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        """Set once the worker listens for assignments."""
        self.counts: dict[str, int] = {"succeeded": 0, "failed": 0, "handed_back": 0}

    # --- declaring handlers ----------------------------------------------------

    def task(
        self, task_type: str, *, concurrency: int = 1, direct: bool = False
    ) -> Callable[[H], H]:
        """Decorator: ``handler(ctx, payload)`` serves ``task_type``, ``concurrency`` at once.

        ``direct=True`` also takes fire-and-forget tasks of this type from
        ``tasks.<type>.direct`` (core NATS, queue group: one worker each):
        at most once, nothing stored, nothing retried; a sender that asked
        with a reply subject gets the :class:`TaskResult`.
        """
        validate_id(task_type, "task type")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")

        def register(handler: H) -> H:
            if task_type in self._routes:
                raise ValueError(f"a handler for {task_type!r} is already registered")
            slots = asyncio.Semaphore(concurrency)
            self._routes[task_type] = _Route(handler, concurrency, slots, direct)
            return handler

        return register

    @property
    def task_types(self) -> list[str]:
        return sorted(self._routes)

    # --- running ---------------------------------------------------------------

    def main(self) -> None:
        """Run until SIGTERM/SIGINT, then drain (a script's entry point)."""
        asyncio.run(self.run())

    def stop(self) -> None:
        """Start draining, as SIGTERM does."""
        self._stop.set()

    async def run(self) -> None:
        if not self._routes:
            raise RuntimeError("no task handlers: declare some with @worker.task(...)")
        own = self.nc is None
        nc = self.nc if self.nc is not None else await connect(name=f"worker-{self.agent_id}")
        self.nc = nc
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                subs = [
                    await nc.subscribe(subjects.agent_tasks(self.agent_id), cb=self._on_assignment)
                ]
                for task_type, route in sorted(self._routes.items()):
                    if route.direct:
                        subject = direct_subject(task_type)
                        subs.append(
                            await nc.subscribe(subject, queue=DIRECT_QUEUE, cb=self._on_direct)
                        )
                await nc.flush()
                keepalive = tg.create_task(self._keepalive())
                self.ready.set()
                log.info("worker %s serves %s", self.agent_id, ", ".join(self.task_types))
                await self._stop.wait()
                await self._drain(subs, keepalive)
        finally:
            self._tg = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if own:
                with contextlib.suppress(Exception):
                    await nc.drain()

    async def _drain(self, subs: list[Any], keepalive: asyncio.Task[None]) -> None:
        self._draining = True
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        # Not started yet: hand back at once. Running: finish within the grace period.
        for held in list(self._held.values()):
            if not held.running and held.runner is not None:
                held.runner.cancel()
        runners = [h.runner for h in self._held.values() if h.runner is not None]
        if runners:
            _, late = await asyncio.wait(runners, timeout=self.grace)
            for runner in late:
                runner.cancel()  # _serve hands it back
            await asyncio.gather(*runners, return_exceptions=True)
        keepalive.cancel()

    async def _on_assignment(self, msg: Msg) -> None:
        version = msg.headers.get(BATCH_HEADER) if msg.headers else None
        if version is not None:
            await self._on_batch(msg, version)
            return
        tg = self._tg
        try:
            assignment = decode(msg.data, TaskAssignment, max_bytes=_MAX_ASSIGNMENT)
        except ContractError as exc:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode(exc.to_reply()))
            return
        held = _Held(msg, assignment, last_report=asyncio.get_running_loop().time())
        if tg is None or self._draining:
            await self._answer(held, TaskOutcome.RETRY, error=_HANDED_BACK)
            return
        key = (assignment.task.id, assignment.attempt)
        if key in self._held:
            return  # the same request again: the first one answers
        self._held[key] = held
        held.runner = tg.create_task(self._serve(held))

    async def _on_batch(self, msg: Msg, version: str) -> None:
        tg = self._tg
        try:
            if version != "1":
                raise ContractError(ErrorCode.INVALID_PAYLOAD, f"unknown {BATCH_HEADER}: {version}")
            batch = decode(msg.data, TaskBatch, max_bytes=MAX_BATCH_BYTES)
        except ContractError as exc:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode(exc.to_reply()))
            return
        if not msg.reply:
            log.warning("task batch without a reply subject: dropped")
            return
        # A repeat inside the batch is the same request again: the first one answers.
        distinct: dict[tuple[str, int], TaskAssignment] = {}
        for assignment in batch.assignments:
            distinct.setdefault((assignment.task.id, assignment.attempt), assignment)
        now = asyncio.get_running_loop().time()
        if tg is None or self._draining:
            answers = []
            for assignment in distinct.values():
                held = _Held(msg, assignment, now)
                answer, body = self._result(held, TaskOutcome.RETRY, None, _HANDED_BACK)
                answers.append((answer, len(body)))
            await self._send(msg, answers)
            return
        out = _Batch(msg, tg)
        for key, assignment in distinct.items():
            if key in self._held:
                continue  # an earlier message holds it and answers it
            held = _Held(msg, assignment, now, batch=out)
            self._held[key] = held
            held.runner = tg.create_task(self._serve(held))

    async def _on_direct(self, msg: Msg) -> None:
        tg = self._tg
        if tg is None or self._draining:
            return  # at most once: a draining worker drops it
        try:
            task = decode(msg.data, Task, max_bytes=MAX_TASK_PAYLOAD_BYTES)
        except ContractError as exc:
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(encode(exc.to_reply()))
            return
        # Never kept alive: ack_wait only sizes the (unused) keepalive.
        assignment = TaskAssignment(task=task, attempt=1, ack_wait=_NO_KEEPALIVE)
        held = _Held(msg, assignment, asyncio.get_running_loop().time(), direct=True)
        key = (f"direct-{id(held)}", 1)
        self._held[key] = held
        held.runner = tg.create_task(self._serve(held, key))

    async def _serve(self, held: _Held, key: tuple[str, int] | None = None) -> None:
        assignment = held.assignment
        task = assignment.task
        route = self._routes.get(task.type)
        try:
            if route is None:
                await self._answer(
                    held, TaskOutcome.FAILED, error=f"agent {self.agent_id} has no {task.type!r}"
                )
                return
            try:
                async with route.slots:
                    if self._draining:
                        raise asyncio.CancelledError
                    held.running = True
                    held.started_at = utc_now()
                    value = await route.handler(TaskContext(self, assignment, held), task.payload)
            except asyncio.CancelledError:
                await self._answer(held, TaskOutcome.RETRY, error=_HANDED_BACK)
                return
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                await self._answer(held, TaskOutcome.FAILED, error=text)
                return
            await self._answer(held, TaskOutcome.SUCCEEDED, result=value)
        finally:
            self._held.pop(key or (task.id, assignment.attempt), None)

    async def _answer(
        self, held: _Held, outcome: TaskOutcome, *, result: Any = None, error: str | None = None
    ) -> None:
        answer, body = self._result(held, outcome, result, error)
        if held.batch is not None:
            self._collect(held.batch, answer, len(body))
            return
        if held.direct and not held.msg.reply:
            return
        try:
            await held.msg.respond(body)
        except nats.errors.Error as exc:
            # The dispatcher sees silence and puts the task back: nothing else to do.
            log.warning("task %s: reply not sent: %s", answer.task_id, exc)

    def _result(
        self, held: _Held, outcome: TaskOutcome, result: Any, error: str | None
    ) -> tuple[TaskResult, bytes]:
        """The counted result of ``held`` and its encoding: failed instead when the
        handler's value cannot go on the wire."""
        assignment = held.assignment

        def build(outcome: TaskOutcome, result: Any, error: str | None) -> TaskResult:
            return TaskResult(
                task_id=assignment.task.id,
                agent_id=self.agent_id,
                attempt=assignment.attempt,
                outcome=outcome,
                result=result,
                error=None if error is None else error[:_MAX_ERROR],
                started_at=held.started_at,
                finished_at=utc_now(),
            )

        answer = build(outcome, result, error)
        try:
            body = encode(answer)
        except (TypeError, msgspec.EncodeError) as exc:
            answer = build(TaskOutcome.FAILED, None, f"result is not JSON-encodable: {exc}")
            body = encode(answer)
        if len(body) > MAX_RESULT_BYTES:
            text = f"result is {len(body)} bytes, the limit is {MAX_RESULT_BYTES}"
            answer = build(TaskOutcome.FAILED, None, text)
            body = encode(answer)
        key = {"succeeded": "succeeded", "failed": "failed", "retry": "handed_back"}
        self.counts[key[answer.outcome.value]] += 1
        return answer, body

    def _collect(self, batch: _Batch, answer: TaskResult, size: int) -> None:
        # call_soon runs after every callback already due in this turn, so the
        # results of all the tasks that finish in this turn share one message.
        if not batch.pending:
            asyncio.get_running_loop().call_soon(self._flush, batch)
        batch.pending.append((answer, size))

    def _flush(self, batch: _Batch) -> None:
        answers, batch.pending = batch.pending, []
        # The batch's runners are still in the group (their last step scheduled
        # this call), so it has not closed yet.
        batch.tg.create_task(self._send(batch.msg, answers))

    async def _send(self, msg: Msg, answers: list[tuple[TaskResult, int]]) -> None:
        for chunk in _chunks(answers):
            try:
                await msg.respond(encode(TaskResults(results=chunk)))
            except nats.errors.Error as exc:
                ids = ", ".join(a.task_id for a in chunk)
                log.warning("tasks %s: results not sent: %s", ids, exc)

    # --- progress --------------------------------------------------------------

    async def _report(self, held: _Held, fraction: float | None, message: str) -> None:
        nc = self.nc
        if nc is None:
            return
        held.last_report = asyncio.get_running_loop().time()
        progress = TaskProgress(
            task_id=held.assignment.task.id,
            agent_id=self.agent_id,
            attempt=held.assignment.attempt,
            fraction=fraction,
            message=message,
            at=utc_now(),
        )
        event = make_event(
            "task.progress",
            source=f"/agents/{self.agent_id}",
            subject=progress.task_id,
            data=msgspec.to_builtins(progress),
        )
        with contextlib.suppress(nats.errors.Error):
            await nc.publish(PROGRESS_SUBJECT, encode(event))

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            intervals = [h.assignment.ack_wait / 3 for h in self._held.values() if not h.direct]
            await asyncio.sleep(min([*intervals, 1.0]) / 2)
            now = loop.time()
            for held in list(self._held.values()):
                if not held.direct and now - held.last_report >= held.assignment.ack_wait / 3:
                    await self._report(held, None, "")


def _chunks(answers: list[tuple[TaskResult, int]]) -> list[list[TaskResult]]:
    """``answers`` (results with their encoded sizes) cut into TaskResults-sized lists."""
    chunks: list[list[TaskResult]] = []
    size = _RESULTS_FRAME
    for answer, length in answers:
        fits = size + 1 + length <= MAX_RESULTS_BYTES
        if chunks and len(chunks[-1]) < MAX_BATCH_ASSIGNMENTS and fits:
            chunks[-1].append(answer)
            size += length + 1
        else:
            chunks.append([answer])
            size = _RESULTS_FRAME + length
    return chunks
