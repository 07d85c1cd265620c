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
import contextvars
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from datetime import datetime
from types import CoroutineType
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
_MAX_ASSIGNMENT = MAX_TASK_PAYLOAD_BYTES + 16 * 1024
_MAX_ERROR = 4096
_NO_KEEPALIVE = 7 * 24 * 3600.0
DIRECT_QUEUE = "fabric-direct"
_HANDED_BACK = "worker draining: handed back"
_COUNTED = {
    TaskOutcome.SUCCEEDED: "succeeded",
    TaskOutcome.FAILED: "failed",
    TaskOutcome.RETRY: "handed_back",
}
# A TaskResults body is built from the results' own encodings (each is encoded
# anyway, to check its size), which is byte for byte what encoding it whole gives.
_RESULTS_OPEN = b'{"results":['
_RESULTS_CLOSE = b"]}"
# TaskResults around its results: the results' own bytes plus this and a comma each.
_RESULTS_FRAME = len(_RESULTS_OPEN) + len(_RESULTS_CLOSE)

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
    direct: bool = False
    running: int = 0
    """Runners: each holds one of the ``concurrency`` slots."""
    starting: int = 0
    """Runners not started yet (each will take an assignment that waits, if any)."""
    waiting: deque[_Held] = field(default_factory=deque)
    """Assignments waiting for a runner, first come first served."""


@dataclass(slots=True)
class _Held:
    """One assignment this worker holds, waiting for a slot or running."""

    msg: Msg
    assignment: TaskAssignment
    key: tuple[str, int]
    """Its key in ``Worker._held``."""
    last_report: float
    started_at: datetime
    """When it came, until its handler starts."""
    runner: asyncio.Task[Any] | None = None
    running: bool = False
    direct: bool = False
    """Came on ``tasks.<type>.direct``: no keepalive, a reply only if one was asked."""
    batch: _Batch | None = None
    """Came in a :class:`TaskBatch`: answered with the batch's other results."""


@dataclass(slots=True)
class _Batch:
    """The reply side of one :class:`TaskBatch`: results waiting for the end of the
    event-loop turn they finished in, to go out together."""

    msg: Msg
    tg: asyncio.TaskGroup
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    """Results not sent yet (task id, encoded result); non-empty means a flush is due."""


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
            self._routes[task_type] = _Route(handler, concurrency, direct)
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
        # (A runner not yet started sees the drain when it starts and hands back too.)
        for route in self._routes.values():
            await self._hand_back(route)
        runners = [h.runner for h in self._held.values() if h.runner is not None]
        if runners:
            _, late = await asyncio.wait(runners, timeout=self.grace)
            for runner in late:
                runner.cancel()  # _serve hands it back
            await asyncio.gather(*runners, return_exceptions=True)
        # Let the flushes due for the handed-back ones start their sends in the group.
        await asyncio.sleep(0)
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
        key = (assignment.task.id, assignment.attempt)
        now = asyncio.get_running_loop().time()
        held = _Held(msg, assignment, key, now, utc_now())
        if tg is None or self._draining:
            await self._answer(held, TaskOutcome.RETRY, error=_HANDED_BACK)
            return
        if key in self._held:
            return  # the same request again: the first one answers
        self._held[key] = held
        self._admit(held, tg)

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
        # All of it came at once: one clock reading serves every assignment.
        now = asyncio.get_running_loop().time()
        came = utc_now()
        if tg is None or self._draining:
            answers = []
            seen: set[tuple[str, int]] = set()
            for assignment in batch.assignments:
                key = (assignment.task.id, assignment.attempt)
                if key in seen:
                    continue  # a repeat is the same request again: answered once
                seen.add(key)
                held = _Held(msg, assignment, key, now, came)
                _, body = self._result(held, TaskOutcome.RETRY, None, _HANDED_BACK)
                answers.append((key[0], body))
            await self._send(msg, answers)
            return
        out = _Batch(msg, tg)
        held_now = self._held
        for assignment in batch.assignments:
            key = (assignment.task.id, assignment.attempt)
            if key in held_now:
                # An earlier message, or an earlier copy in this batch, holds it and answers it.
                continue
            held = _Held(msg, assignment, key, now, came, batch=out)
            held_now[key] = held
            self._admit(held, tg)

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
        now = asyncio.get_running_loop().time()
        held = _Held(msg, assignment, ("", 1), now, utc_now(), direct=True)
        held.key = (f"direct-{id(held)}", 1)
        self._held[held.key] = held
        self._admit(held, tg)

    def _admit(self, held: _Held, tg: asyncio.TaskGroup) -> None:
        """Queue ``held`` for a slot of its type, and see that a runner will come."""
        route = self._routes.get(held.assignment.task.type)
        if route is None:
            held.runner = tg.create_task(self._refuse(held))
            return
        route.waiting.append(held)
        if not route.starting:
            self._spread(route, tg)

    def _spread(self, route: _Route, tg: asyncio.TaskGroup | None = None) -> None:
        """Start runners for what waits on ``route`` and no runner will take, as far
        as its slots go. Called on admission (one runner, which serves a whole burst
        of quick tasks alone) and when a handler first waits (one each for the rest,
        so they run side by side as tasks of their own would)."""
        tg = tg or self._tg
        if tg is None or self._draining:
            return
        need = min(len(route.waiting) - route.starting, route.concurrency - route.running)
        for _ in range(need):
            route.running += 1
            route.starting += 1
            tg.create_task(self._run(route))

    async def _run(self, route: _Route) -> None:
        """One slot of ``route``: serves what waits for it until nothing does.

        A runner goes on to the next assignment instead of ending, so a burst of
        quick tasks costs one runner rather than a task each; every handler
        still gets a context of its own (:class:`_Isolated`)."""
        route.starting -= 1
        runner = asyncio.current_task()
        try:
            while route.waiting and not self._draining:
                held = route.waiting.popleft()
                held.runner = runner
                await self._serve(held, route)
                if runner is not None and runner.cancelling():
                    break
        finally:
            route.running -= 1
            if runner is not None and runner.cancelling():
                # Cancelled from outside (the group is failing, or run() was
                # cancelled): what waits is handed back, as its own task would be.
                await self._hand_back(route)

    async def _hand_back(self, route: _Route) -> None:
        """Answer ``retry`` for everything waiting on ``route``: it never started."""
        while route.waiting:
            held = route.waiting.popleft()
            self._held.pop(held.key, None)
            await self._answer(held, TaskOutcome.RETRY, error=_HANDED_BACK)

    async def _refuse(self, held: _Held) -> None:
        try:
            text = f"agent {self.agent_id} has no {held.assignment.task.type!r}"
            await self._answer(held, TaskOutcome.FAILED, error=text)
        finally:
            self._held.pop(held.key, None)

    async def _serve(self, held: _Held, route: _Route) -> None:
        task = held.assignment.task
        try:
            try:
                held.running = True
                held.started_at = utc_now()
                ctx = TaskContext(self, held.assignment, held)
                args = (ctx, task.payload)
                value = await _Isolated(route.handler, args, lambda: self._spread(route))
            except asyncio.CancelledError:
                await self._answer(held, TaskOutcome.RETRY, error=_HANDED_BACK)
                return
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                await self._answer(held, TaskOutcome.FAILED, error=text)
                return
            await self._answer(held, TaskOutcome.SUCCEEDED, result=value)
        finally:
            self._held.pop(held.key, None)

    async def _answer(
        self, held: _Held, outcome: TaskOutcome, *, result: Any = None, error: str | None = None
    ) -> None:
        answer, body = self._result(held, outcome, result, error)
        if held.batch is not None:
            self._collect(held.batch, answer.task_id, body)
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
        answer = TaskResult(
            task_id=assignment.task.id,
            agent_id=self.agent_id,
            attempt=assignment.attempt,
            outcome=outcome,
            result=result,
            error=None if error is None else error[:_MAX_ERROR],
            started_at=held.started_at,
            finished_at=utc_now(),
        )
        try:
            body = encode(answer)
        except (TypeError, msgspec.EncodeError) as exc:
            answer = msgspec.structs.replace(
                answer,
                outcome=TaskOutcome.FAILED,
                result=None,
                error=f"result is not JSON-encodable: {exc}"[:_MAX_ERROR],
                finished_at=utc_now(),
            )
            body = encode(answer)
        if len(body) > MAX_RESULT_BYTES:
            text = f"result is {len(body)} bytes, the limit is {MAX_RESULT_BYTES}"
            answer = msgspec.structs.replace(
                answer,
                outcome=TaskOutcome.FAILED,
                result=None,
                error=text[:_MAX_ERROR],
                finished_at=utc_now(),
            )
            body = encode(answer)
        self.counts[_COUNTED[answer.outcome]] += 1
        return answer, body

    def _collect(self, batch: _Batch, task_id: str, body: bytes) -> None:
        # call_soon runs after every callback already due in this turn, so the
        # results of all the tasks that finish in this turn share one message.
        if not batch.pending:
            asyncio.get_running_loop().call_soon(self._flush, batch)
        batch.pending.append((task_id, body))

    def _flush(self, batch: _Batch) -> None:
        answers, batch.pending = batch.pending, []
        # The batch's runners are still in the group (their last step scheduled
        # this call), or the drain is (it waits a turn for this), so it is open.
        batch.tg.create_task(self._send(batch.msg, answers))

    async def _send(self, msg: Msg, answers: list[tuple[str, bytes]]) -> None:
        nc = self.nc
        if nc is None:
            return  # never: batches come only through a connection the worker has
        reply = msg.reply
        for chunk in _chunks(answers):
            body = b"".join((_RESULTS_OPEN, b",".join(body for _, body in chunk), _RESULTS_CLOSE))
            try:
                # Straight to the reply subject: msg.respond would copy the batch's
                # headers onto every reply, which the controller does not read.
                await nc.publish(reply, body)
            except nats.errors.Error as exc:
                ids = ", ".join(task_id for task_id, _ in chunk)
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


class _Isolated:
    """Awaits ``handler(*args)`` in a copy of the current context, stepping it as a
    task of its own would: a runner serves one assignment after another, and a
    handler must not see the context variables an earlier one set."""

    __slots__ = ("_args", "_context", "_handler", "_on_wait")

    def __init__(
        self, handler: Handler, args: tuple[Any, ...], on_wait: Callable[[], None]
    ) -> None:
        self._handler = handler
        self._args = args
        self._context = contextvars.copy_context()
        self._on_wait = on_wait
        """Called once, when the handler first waits (or might: not a coroutine)."""

    def __await__(self) -> Generator[Any, Any, Any]:
        run = self._context.run
        awaitable = run(self._handler, *self._args)
        if type(awaitable) is not CoroutineType:
            self._on_wait()
            return (yield from awaitable.__await__())  # not a coroutine: no steps to wrap
        coro: Coroutine[Any, Any, Any] = awaitable
        step: Callable[[Any], Any] = coro.send
        arg: Any = None
        on_wait: Callable[[], None] | None = self._on_wait
        while True:
            try:
                yielded = run(step, arg)
            except StopIteration as stop:
                return stop.value
            if on_wait is not None:
                on_wait()
                on_wait = None
            try:
                arg = yield yielded
                step = coro.send
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation among them: the handler's to handle
                step, arg = coro.throw, exc


def _chunks(answers: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """``answers`` (task ids with their encoded results) cut into TaskResults-sized lists."""
    chunks: list[list[tuple[str, bytes]]] = []
    size = _RESULTS_FRAME
    for answer in answers:
        length = len(answer[1])
        fits = size + 1 + length <= MAX_RESULTS_BYTES
        if chunks and len(chunks[-1]) < MAX_BATCH_ASSIGNMENTS and fits:
            chunks[-1].append(answer)
            size += length + 1
        else:
            chunks.append([answer])
            size = _RESULTS_FRAME + length
    return chunks
