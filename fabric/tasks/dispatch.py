"""The dispatcher: takes tasks from the shared durable consumer and hands each
to a running agent that serves its type. It runs inside every controller.

Fresh tasks (first delivery, not a retry, not ``exec``) take the batched lane
of :mod:`fabric.tasks.lane`: the same steps as below, for many tasks per
message and per round of writes. What follows is the one-by-one path every
other task takes, and the one the lane hands a task to whenever it must read
the task's record first.

One task, from fetch to ack::

    fetch ─▶ decode (bad: term) ─▶ claim its KV record (final already: ack, done)
      ─▶ choose_agent over the live view ──none serves the type──▶ nak(delay), record why
      ─▶ request agents.<id>.tasks (TaskAssignment)   ◀─ in_progress every ack_wait/3,
      │                                                  and on the worker's progress
      ├─ succeeded ──▶ record succeeded ─▶ events.task.completed ─▶ ack
      ├─ failed / lost agent / silent worker / timeout ──▶ record failed
      │     ├─ attempts left ─▶ events.task.failed ─▶ nak(backoff)
      │     └─ none left ──▶ copy to tasks.<type>.dead ─▶ record dead ─▶ events.task.dead ─▶ term
      └─ handed back (draining worker, no responders, our own connection) ─▶ record queued ─▶ nak

A task is acked only after its result is in KV, so a dispatcher that dies
at any point loses nothing: JetStream redelivers after the ack wait, and the
next dispatcher finds a final record (ack without running it again) or
runs it once more (at least once). The decision of which agent is the pure
:func:`choose_agent`; this module's class only moves messages.

Events: ``events.task.completed`` when a task succeeds,
``events.task.failed`` for each failed attempt, ``events.task.dead`` when it
is dead-lettered. A task's final event (``task.completed``, ``task.dead``)
is stored in EVENTS, confirmed by JetStream, before the task's ack or term; when it
cannot be (a server lost, a stream leader being elected) the task goes back
and its redelivery, finding the final record, publishes the event again
under the same ``Nats-Msg-Id``. So no acknowledged task lacks its event.

Priority (``Task.priority``, 0..9, higher first): JetStream delivers in
stream order, so priority orders what one dispatcher holds. A fetched batch
is started best first, and tasks waiting here for a slot (their type's
limit, or every capable agent busy) take freed slots best first, first come
within a priority (:class:`~fabric.tasks.priority.SlotQueue`). No order
across task types or across controllers; see :mod:`fabric.tasks.priority`.

Batch tasks (type ``exec``): a dispatcher built for a controller runs them
itself, as one-shot agents placed by the controller (:mod:`fabric.tasks.batch`);
they take a slot of their type like any task, need no capable agent, and
settle like any task (exit 0 succeeded, else a failed attempt). A bad payload
is dead at once with ``invalid_payload``.

Worker liveness: a worker holding an assignment reports progress at least
every ``ack_wait / 3`` (the SDK does it by itself); silence for ``ack_wait``
or the agent leaving the controller's view of running agents counts as a
lost attempt and the task goes back to the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from fabric.cancelled import raise_if_cancelled
from fabric.connect import js_publish
from fabric.controller.streams import EVENTS_STREAM
from fabric.tasks.admission import admit
from fabric.tasks.agents import (
    AgentView,
    Candidate,
    choose_agent,
    controller_agents,
    retry_delay,
)
from fabric.tasks.batch import (
    BatchRunner,
    ControllerFleet,
    exec_agent_id,
    parse_payload,
)
from fabric.tasks.lane import Lane
from fabric.tasks.pipe import StoredPublisher
from fabric.tasks.priority import SlotQueue, Ticket, by_priority
from fabric.tasks.records import (
    STORE_ERRORS,
    DeadTask,
    RecordStore,
    Stored,
    TaskRecord,
    TaskState,
    after_failure,
    handed_back,
    started,
    succeeded,
    transition,
    waiting,
    went_dead,
    with_progress,
)
from fabric.tasks.runs import Back, Run
from fabric.tasks.stream import (
    DEAD_STREAM,
    DISPATCH_CONSUMER,
    RECORDS_BUCKET,
    TASKS_STREAM,
    QueueSettings,
    allow_direct_get,
    dead_subject,
    ensure_task_state,
)
from schemas import subjects
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.event import make_event
from schemas.task import (
    EXEC_TASK_TYPE,
    MAX_TASK_PAYLOAD_BYTES,
    ExecPayload,
    Task,
    TaskAssignment,
    TaskOutcome,
    TaskProgress,
    TaskResult,
)

__all__ = [
    "PROGRESS_SUBJECT",
    "AgentView",
    "Candidate",
    "DispatchSettings",
    "Dispatcher",
    "choose_agent",
    "controller_agents",
    "retry_delay",
]

log = logging.getLogger(__name__)

PROGRESS_SUBJECT = "events.task.progress"
MAX_DELIVERIES_ADVISORY = (
    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{TASKS_STREAM}.{DISPATCH_CONSUMER}"
)
_MAX_REPLY = 2 * MAX_TASK_PAYLOAD_BYTES + 64 * 1024
_FINAL_EVENTS = {TaskState.SUCCEEDED: "task.completed", TaskState.DEAD: "task.dead"}
_MAX_PROGRESS = 64 * 1024


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    queue: QueueSettings = field(default_factory=QueueSettings)
    batch: int = 128
    """Messages asked for per fetch."""
    max_inflight: int = 1024
    """Messages one dispatcher holds at once (waiting for a slot or running)."""
    event_timeout: float = 5.0
    """How long a task's event may take to be stored before the task goes back."""
    agent_limit: int = 32
    """Tasks one agent runs at once, from this dispatcher."""
    type_limit: int = 512
    type_limits: Mapping[str, int] = field(default_factory=dict)
    """Per task type concurrency limits (this dispatcher); others get type_limit."""
    no_agent_delay: float = 1.0
    """Redelivery delay when no running agent serves the type; grows with each
    delivery up to no_agent_max."""
    no_agent_max: float = 5.0
    busy_hold: float = 2.0
    """How long a task waits here for a free slot before going back to the queue."""
    retry_base: float = 1.0
    retry_cap: float = 60.0
    handback_delay: float = 0.2
    run_timeout: float = 24 * 3600.0
    """The longest wait for a result when a task has no deadline."""
    fetch_wait: float = 1.0
    view_ttl: float = 0.05
    watch_every: float = 0.5
    """How often a running task's agent is looked up in the view (lost: retry at once)."""
    lane: bool = True
    """Run fresh tasks through the batched lane (fabric.tasks.lane); False: every
    task takes the one-by-one path."""
    running_after: float = 1.0
    """A lane task's ``running`` record is written once it has run this long (or
    reports progress); a shorter one only gets its final record."""
    shun_for: float = 5.0
    """An agent that did not answer (no responders, silent, lost) is not chosen
    for this long, even if the registry still lists it."""


_ONE_SHOT = Candidate("", None, frozenset({EXEC_TASK_TYPE}))
"""What :meth:`Dispatcher._place` returns for an ``exec`` task: run it here."""


class EventNotStored(Exception):
    """JetStream did not confirm a task's final event: the task must go back."""


class _ProgressEvent(msgspec.Struct):
    data: Any = None


class _Priority(msgspec.Struct):
    """Only a task's priority, to order a fetched batch before the full decode."""

    priority: int = 5


_peek = msgspec.json.Decoder(_Priority)


def _peek_priority(msg: Msg) -> int:
    try:
        return _peek.decode(msg.data).priority
    except msgspec.DecodeError:
        return 5  # not a task: _handle refuses it


class _MaxDeliveries(msgspec.Struct):
    stream_seq: int
    deliveries: int = 0


class Dispatcher:
    """Fetches from ``dispatch`` and runs tasks on agents; :meth:`run` until cancelled."""

    def __init__(
        self,
        nc: Client,
        name: str,
        agents: AgentView,
        settings: DispatchSettings | None = None,
        batch: BatchRunner | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.source = f"/controllers/{name}"
        self.settings = settings or DispatchSettings()
        self._agents = agents
        self.batch = batch
        """Runs ``exec`` tasks as one-shot agents (None: exec is a type like any other)."""
        self._view: Mapping[str, Candidate] = {}
        self._view_at = -1.0
        self.store: RecordStore | None = None
        self.by_agent: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.runs: dict[str, Run] = {}
        self.counts: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self._held = 0
        self._changed = asyncio.Condition()
        self._shunned: dict[str, float] = {}
        self._events_stream = False
        self.slots = SlotQueue()
        """Tasks held here waiting for a slot, best first per type."""
        self._arrivals = 0
        self.lane: Lane | None = None
        """Runs fresh tasks in batches (fabric.tasks.lane); None until run() sets it up."""

    @classmethod
    def for_controller(
        cls, controller: Any, settings: DispatchSettings | None = None
    ) -> Dispatcher:
        """The dispatcher a controller runs: its connection, its name, its live view.

        Settings: ``settings``, else the controller's ``task_settings`` attribute
        when it has one, else the defaults.
        """
        settings = settings or getattr(controller, "task_settings", None)
        return cls(
            controller.nc,
            controller.config.name,
            lambda: controller_agents(controller),
            settings,
            batch=BatchRunner(
                ControllerFleet(controller), getattr(controller, "exec_settings", None)
            ),
        )

    @property
    def ack_wait(self) -> float:
        return self.settings.queue.ack_wait

    # --- the loop ------------------------------------------------------------

    async def run(self) -> None:
        kv = await self._ensure_state()
        self.store = RecordStore(kv)
        self._events_stream = await self._has_events_stream()
        psub = await self.js.pull_subscribe_bind(
            durable=DISPATCH_CONSUMER, stream=TASKS_STREAM, pending_msgs_limit=0
        )
        progress = await self.nc.subscribe(PROGRESS_SUBJECT, cb=self._on_progress)
        given_up = await self.nc.subscribe(
            MAX_DELIVERIES_ADVISORY, queue="fabric-dispatch", cb=self._on_max_deliveries
        )
        if self.settings.lane:
            self.lane = await self._open_lane()
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = []
                if self.batch is not None:
                    helpers.append(tg.create_task(self.batch.sweep_forever()))
                if self.lane is not None:
                    helpers.append(tg.create_task(self.lane.watch_forever()))
                self.ready.set()
                await self._fetch_loop(psub, tg)
                for helper in helpers:
                    helper.cancel()  # the connection closed: nothing to do with it
        finally:
            if self.lane is not None:
                await self.lane.stop()
            for sub in (psub, progress, given_up):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _open_lane(self) -> Lane | None:
        """The batched lane, or None when the records stream cannot serve its
        lookups (batch direct gets: nats-server 2.11+)."""
        records_stream = f"KV_{RECORDS_BUCKET}"
        if not await allow_direct_get(self.js, records_stream):
            log.warning("the batched task lane is off: %s has no direct gets", records_stream)
            return None
        lane = Lane(self, StoredPublisher(self.nc, timeout=self.settings.event_timeout))
        await lane.start()
        return lane

    async def _has_events_stream(self) -> bool:
        """True when EVENTS exists (a controller made it before starting us)."""
        try:
            await self.js.stream_info(EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, TimeoutError):
            # Unknown: assume it is there, so events are waited for, not dropped.
            return True
        return True

    async def _ensure_state(self) -> Any:
        delay = 0.2
        while True:
            raise_if_cancelled()
            try:
                return await ensure_task_state(self.nc, self.js, self.settings.queue)
            except STORE_ERRORS as exc:
                log.warning("task queue state not ready: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _fetch_loop(self, psub: Any, tg: asyncio.TaskGroup) -> None:
        settings = self.settings
        while not self.nc.is_closed:
            raise_if_cancelled()
            room = settings.max_inflight - self._held
            if room <= 0:
                async with self._changed:
                    await self._changed.wait_for(lambda: self._held < settings.max_inflight)
                continue
            try:
                msgs = await psub.fetch(min(settings.batch, room), timeout=settings.fetch_wait)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.info("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            # Best first, so a batch with more tasks than free slots gives them
            # to the higher priorities (see fabric.tasks.priority).
            ordered = by_priority(msgs, _peek_priority)
            self._held += len(ordered)
            if self.lane is not None:
                await self.lane.take(ordered, tg)
                continue
            for msg in ordered:
                tg.create_task(self._guarded(msg, self.arrive()))

    def arrive(self) -> int:
        """The next arrival number (first come first served within a priority)."""
        self._arrivals += 1
        return self._arrivals

    async def _guarded(self, msg: Msg, arrival: int = 0, task: Task | None = None) -> None:
        """Handle one message (``task``: decoded and admitted already), then let it go."""
        try:
            if task is None:
                await self._handle(msg, arrival)
            else:
                await self._handle_task(msg, task, arrival)
        except Exception as exc:
            await self.give_back(msg, exc)
        finally:
            await self.let_go()

    async def give_back(self, msg: Msg, exc: Exception) -> None:
        """A store or connection failure: the task goes back and is tried again."""
        log.warning("task %s: %s: %s", msg.subject, type(exc).__name__, exc)
        self.counts["errors"] += 1
        with contextlib.suppress(Exception):
            await msg.nak(delay=self.settings.handback_delay)

    async def let_go(self, count: int = 1) -> None:
        """``count`` held messages are settled: room for more fetches."""
        self._held -= count
        await self._notify()

    async def _notify(self) -> None:
        if self.lane is not None:
            self.lane.poke()
        async with self._changed:
            self._changed.notify_all()

    def agents(self) -> Mapping[str, Candidate]:
        """The running agents (cached for ``view_ttl``)."""
        now = asyncio.get_running_loop().time()
        if now - self._view_at > self.settings.view_ttl:
            self._view = self._agents()
            self._view_at = now
        return self._view

    def _choosable(self) -> Mapping[str, Candidate]:
        view = self.agents()
        if not self._shunned:
            return view
        now = asyncio.get_running_loop().time()
        for agent_id, until in list(self._shunned.items()):
            if until <= now:
                del self._shunned[agent_id]
        return {a: c for a, c in view.items() if a not in self._shunned}

    # --- one task ------------------------------------------------------------

    async def _handle(self, msg: Msg, arrival: int = 0) -> None:
        task = await self.intake(msg)
        if task is not None:
            await self._handle_task(msg, task, arrival)

    async def intake(self, msg: Msg) -> Task | None:
        """The task to run, or None: not a task or not admitted (termed, counted)."""
        try:
            task = decode(msg.data, Task, max_bytes=MAX_TASK_PAYLOAD_BYTES)
            if msg.subject != subjects.task_queue(task.type):
                raise ContractError(
                    ErrorCode.INVALID_PAYLOAD, f"a {task.type!r} task cannot come on {msg.subject}"
                )
        except ContractError as exc:
            # Not a task (published around the SDK): it can never run.
            log.warning("refusing message on %s: %s", msg.subject, exc)
            self.counts["refused"] += 1
            await msg.term()
            return None
        # The submit token (fabric.tasks.admission): refused tasks are recorded and termed.
        return await admit(self, msg, task)

    async def _handle_task(self, msg: Msg, task: Task, arrival: int = 0) -> None:
        store = self.store
        assert store is not None
        stored: Stored | None = None
        if msg.metadata.num_delivered > 1:
            # Seen before: maybe finished already (an ack that was lost), or spent.
            stored = await store.get(task.id)
            if stored is not None and await self._finished(msg, task, stored):
                return
        elif task.deadline is not None and task.deadline <= utc_now():
            stored, _ = await store.claim(task, self.name)
            await self._finished(msg, task, stored)
            return
        command: ExecPayload | None = None
        if self.batch is not None and task.type == EXEC_TASK_TYPE:
            try:
                command = parse_payload(task.payload)
            except ContractError as exc:
                # It could never run: dead at once, with the code, never tried.
                if stored is None:
                    stored, _ = await store.claim(task, self.name)
                await self._dead(msg, task, stored, f"{exc.code.value}: {exc.message}")
                return
        choice = await self._place(task, msg, arrival)
        if isinstance(choice, tuple):
            await self.not_now(msg, task, stored, *choice)
            return
        if command is not None:
            await self._run_exec(msg, task, stored, command)
            return
        await self._run(msg, task, stored, choice)

    async def not_now(
        self, msg: Msg, task: Task, stored: Stored | None, reason: str, delay: float
    ) -> None:
        """The task cannot run yet: say why in its record, and let it come back later."""
        store = self.store
        assert store is not None
        if stored is None:
            stored, created = await store.claim(task, self.name)
            if not created and await self._finished(msg, task, stored):
                return
        if stored.record.waiting != reason:
            stored = await store.save(stored, lambda r: waiting(r, reason))
        self.counts["waiting"] += 1
        await msg.nak(delay=delay)

    async def _finished(self, msg: Msg, task: Task, stored: Stored) -> bool:
        """Settle a task with nothing left to run: final already (ack), or out of
        attempts or past its deadline (dead letter). False: it should run."""
        record = stored.record
        if record.final:
            # Its dispatcher may have died before the event and the ack: say it
            # again. A refused id has no task event (its refusal was audited).
            kind = _FINAL_EVENTS.get(record.state)
            if kind is not None:
                await self._event(kind, record)
            self.counts["duplicates"] += 1
            await msg.ack()
            return True
        if record.attempts >= task.max_attempts:
            # A dispatcher died between recording the last failure and the dead letter.
            await self._dead(msg, task, stored, record.error or "attempts spent")
            return True
        if task.deadline is not None and task.deadline <= utc_now():
            await self._dead(msg, task, stored, "deadline passed before the task could run")
            return True
        return False

    async def _place(self, task: Task, msg: Msg, arrival: int = 0) -> Candidate | tuple[str, float]:
        """A candidate (its slot reserved), or why not and the nak delay.

        While it waits, the task holds a ticket in :attr:`slots`: only the
        best-ranked waiter of a type may take a free slot of that type.
        """
        ticket = self.slots.join(task.type, task.priority, arrival)
        try:
            return await self._wait_for_slot(task, msg, ticket)
        finally:
            self.slots.leave(ticket)
            # The next waiter of this type may now be first and find a slot.
            await self._notify()

    async def _wait_for_slot(
        self, task: Task, msg: Msg, ticket: Ticket
    ) -> Candidate | tuple[str, float]:
        settings = self.settings
        loop = asyncio.get_running_loop()
        hold_until = loop.time() + settings.busy_hold
        kept_at = loop.time()
        while True:
            taken = self.take_slot(task, msg, ticket)
            if not isinstance(taken, str):
                return taken
            reason = taken
            now = loop.time()
            if now >= hold_until:
                return reason, settings.handback_delay
            if now - kept_at >= self.ack_wait / 3:
                await msg.in_progress()
                kept_at = now
            with contextlib.suppress(TimeoutError):
                async with self._changed, asyncio.timeout(min(hold_until - now, 0.25)):
                    await self._changed.wait()

    def take_slot(
        self, task: Task, msg: Msg, ticket: Ticket
    ) -> Candidate | tuple[str, float] | str:
        """A slot taken (the agent, reserved), a reason to give up now and its nak
        delay, or (a string) why the task keeps waiting."""
        settings = self.settings
        limit = settings.type_limits.get(task.type, settings.type_limit)
        one_shot = self.batch is not None and task.type == EXEC_TASK_TYPE
        view: Mapping[str, Candidate] = {} if one_shot else self._choosable()
        if not one_shot and not any(
            task.type in c.capabilities and c.healthy for c in view.values()
        ):
            delivered = msg.metadata.num_delivered
            delay = min(settings.no_agent_max, settings.no_agent_delay * delivered)
            return f"no running agent serves {task.type!r}", delay
        if self.by_type[task.type] >= limit:
            return f"{task.type!r} tasks are at their concurrency limit ({limit})"
        if not self.slots.first(ticket):
            ahead = self.slots.ahead(ticket)
            return f"waiting for a free slot, {ahead} {task.type!r} tasks ranked ahead"
        if one_shot:
            # Run by this dispatcher as a one-shot agent (fabric.tasks.batch).
            self.by_type[task.type] += 1
            return _ONE_SHOT
        agent_id = choose_agent(task.type, view, self.by_agent, limit=settings.agent_limit)
        if agent_id is None:
            return f"every agent serving {task.type!r} is busy"
        self.by_agent[agent_id] += 1
        self.by_type[task.type] += 1
        return view[agent_id]

    async def _run(self, msg: Msg, task: Task, stored: Stored | None, agent: Candidate) -> None:
        """Record it running, send it, wait, settle; ``agent``'s slot is reserved."""

        def start(record: TaskRecord) -> TaskRecord:
            return started(record, agent.agent_id, agent.node_id, self.name)

        run: Run | None = None
        try:
            begun = await self._record_start(msg, task, stored, start)
            if begun is None:
                return
            stored = begun
            attempt = stored.record.attempts + 1
            run = Run(task, msg, agent.agent_id, attempt, asyncio.get_running_loop().time())
            self.runs[task.id] = run
            assignment = TaskAssignment(task=task, attempt=attempt, ack_wait=self.ack_wait)
            timeout = self.settings.run_timeout
            if task.deadline is not None:
                timeout = max(0.1, min(timeout, (task.deadline - utc_now()).total_seconds()))
            request = asyncio.create_task(
                self.nc.request(subjects.agent_tasks(agent.agent_id), encode(assignment), timeout)
            )
            outcome, stored = await self._watch(request, run, stored)
        finally:
            if run is not None:
                self.runs.pop(task.id, None)
            self.release(agent.agent_id, task.type)
            await self._notify()
        await self.settle(msg, task, stored, outcome, run.attempt, agent)

    def release(self, agent_id: str, task_type: str) -> None:
        """Give back the slot :meth:`take_slot` reserved."""
        self.by_agent[agent_id] -= 1
        if self.by_agent[agent_id] <= 0:
            del self.by_agent[agent_id]
        self.by_type[task_type] -= 1

    async def _record_start(
        self,
        msg: Msg,
        task: Task,
        stored: Stored | None,
        start: Callable[[TaskRecord], TaskRecord],
    ) -> Stored | None:
        """The record moved to running by ``start``, or None when the task turned
        out settled already (acked, or dead-lettered) and must not run."""
        store = self.store
        assert store is not None
        if stored is None:
            # First delivery: the record is created already running (one write).
            stored, created = await store.claim(task, self.name, first=start)
            if not created:
                if await self._finished(msg, task, stored):
                    return None
                stored = await store.save(stored, start)
        else:
            stored = await store.save(stored, start)
        if stored.record.final:
            await self._finished(msg, task, stored)
            return None
        return stored

    async def _run_exec(
        self, msg: Msg, task: Task, stored: Stored | None, command: ExecPayload
    ) -> None:
        """Run an ``exec`` task as a one-shot agent (fabric.tasks.batch), then settle
        it like any task; its type slot is reserved."""
        store, batch = self.store, self.batch
        assert store is not None and batch is not None
        resumed = False

        def start(record: TaskRecord) -> TaskRecord:
            nonlocal resumed
            agent_id = exec_agent_id(task.id, record.attempts + 1, task.retry)
            # Running this very attempt already: its dispatcher stopped mid-run, so
            # the one-shot may be alive. Watch it; never start a second one.
            resumed = record.state is TaskState.RUNNING and record.agent_id == agent_id
            if resumed:
                return transition(record, TaskState.RUNNING, dispatcher=self.name)
            return started(record, agent_id, None, self.name)

        try:
            begun = await self._record_start(msg, task, stored, start)
            if begun is None:
                return
            stored = begun
            attempt = stored.record.attempts + 1
            limit = None
            if task.deadline is not None:
                limit = max(0.1, (task.deadline - utc_now()).total_seconds())
            running = asyncio.create_task(
                batch.run(
                    task,
                    command,
                    attempt,
                    resumed=resumed,
                    since=stored.record.started_at,
                    limit=limit,
                )
            )
            try:
                while True:
                    done, _ = await asyncio.wait({running}, timeout=self.ack_wait / 3 * 0.9)
                    if done:
                        break
                    await msg.in_progress()
            finally:
                running.cancel()
            outcome, node_id = running.result()
        finally:
            self.by_type[task.type] -= 1
            await self._notify()
        if node_id is not None:
            stored = await store.save(stored, _on_node(node_id))
        agent = Candidate(outcome.agent_id, node_id, frozenset({EXEC_TASK_TYPE}))
        await self.settle(msg, task, stored, outcome, attempt, agent)

    async def _watch(
        self, request: asyncio.Task[Msg], run: Run, stored: Stored
    ) -> tuple[TaskResult | Back, Stored]:
        """Wait for the reply, keeping the message alive and the agent watched."""
        store = self.store
        assert store is not None
        loop = asyncio.get_running_loop()
        keep_every = self.ack_wait / 3
        kept_at = loop.time()
        tick = min(keep_every, self.settings.watch_every)
        try:
            while True:
                raise_if_cancelled()
                done, _ = await asyncio.wait({request}, timeout=tick)
                if done:
                    return self._reply(request, run), stored
                if loop.time() - kept_at >= keep_every * 0.9:
                    await run.msg.in_progress()
                    kept_at = loop.time()
                if run.agent_id not in self.agents():
                    lost = Back(f"agent {run.agent_id} stopped running it", counts=True, shun=True)
                    return lost, stored
                if loop.time() - run.last_heard > self.ack_wait:
                    silent = Back(f"agent {run.agent_id} went silent", counts=True, shun=True)
                    return silent, stored
                if run.progress is not None:
                    stored = await store.save(stored, _progress_change(*run.progress))
                    run.progress = None
        finally:
            request.cancel()

    def _reply(self, request: asyncio.Task[Msg], run: Run) -> TaskResult | Back:
        try:
            reply = request.result()
        except nats.errors.NoRespondersError:
            return Back(f"agent {run.agent_id} is not taking tasks", counts=False, shun=True)
        except (nats.errors.TimeoutError, TimeoutError):
            return Back(f"no result from agent {run.agent_id} in time", counts=True)
        except nats.errors.Error as exc:
            return Back(f"could not reach agent {run.agent_id}: {exc}", counts=False)
        try:
            result = decode(reply.data, TaskResult, max_bytes=_MAX_REPLY)
        except ContractError as exc:
            try:
                refusal = decode(reply.data, ErrorReply, max_bytes=_MAX_REPLY)
            except ContractError:
                return Back(f"bad reply from agent {run.agent_id}: {exc}", counts=True)
            return Back(f"{refusal.code.value}: {refusal.message}", counts=True)
        if result.task_id != run.task.id or result.attempt != run.attempt:
            return Back(f"agent {run.agent_id} answered for another task", counts=True)
        return result

    async def settle(
        self,
        msg: Msg,
        task: Task,
        stored: Stored,
        outcome: TaskResult | Back,
        attempt: int,
        agent: Candidate,
    ) -> None:
        store = self.store
        assert store is not None
        if isinstance(outcome, TaskResult) and outcome.outcome is TaskOutcome.SUCCEEDED:
            result = outcome
            stored = await store.save(stored, lambda r: succeeded(r, result))
            if stored.applied:
                await self._event("task.completed", stored.record)
                self.counts["succeeded"] += 1
            else:
                self.counts["duplicates"] += 1  # another dispatcher finished it first
            await msg.ack()
            return
        if isinstance(outcome, TaskResult) and outcome.outcome is TaskOutcome.RETRY:
            outcome = Back(outcome.error or f"handed back by agent {agent.agent_id}", False)
        elif isinstance(outcome, TaskResult):
            outcome = Back(outcome.error or "failed", counts=True)
        if outcome.shun:
            until = asyncio.get_running_loop().time() + self.settings.shun_for
            self._shunned[agent.agent_id] = until
        if not outcome.counts:
            reason = outcome.error
            stored = await store.save(stored, lambda r: handed_back(r, reason))
            if not stored.applied:
                self.counts["duplicates"] += 1
                await msg.ack()
                return
            self.counts["handed_back"] += 1
            delay = min(5.0, self.settings.handback_delay * msg.metadata.num_delivered)
            await msg.nak(delay=delay)
            return
        error = outcome.error
        stored = await store.save(stored, lambda r: after_failure(r, attempt, error)[0])
        if not stored.applied:
            self.counts["duplicates"] += 1
            await msg.ack()
            return
        if stored.record.attempts >= stored.record.max_attempts:
            await self._dead(msg, task, stored, error)
            return
        await self._event("task.failed", stored.record, must_store=False)
        self.counts["failed"] += 1
        settings = self.settings
        delay = retry_delay(stored.record.attempts, settings.retry_base, settings.retry_cap)
        await msg.nak(delay=delay)

    async def _dead(self, msg: Msg, task: Task, stored: Stored, error: str) -> None:
        """Dead-letter the task, then term its message."""
        await self._bury(task, stored, error)
        await msg.term()

    async def _bury(
        self, task: Task, stored: Stored, error: str, *, must_store: bool = True
    ) -> None:
        """Copy to ``tasks.<type>.dead`` (deduplicated by task id), then record it dead."""
        store = self.store
        assert store is not None
        record = stored.record
        letter = DeadTask(
            task=task,
            error=error[:4096],
            attempts=record.attempts,
            agent_id=record.agent_id,
            node_id=record.node_id,
            dead_at=utc_now(),
            dispatcher=self.name,
        )
        await js_publish(
            self.js, dead_subject(task.type), encode(letter), msg_id=task.id, stream=DEAD_STREAM
        )
        stored = await store.save(stored, lambda r: went_dead(r, error))
        if stored.applied:
            await self._event("task.dead", stored.record, must_store=must_store)
            self.counts["dead"] += 1

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """JetStream gave up redelivering a task (``max_deliver``): it would sit in the
        stream forever, so it is dead-lettered and deleted."""
        store = self.store
        try:
            advisory = msgspec.json.decode(msg.data, type=_MaxDeliveries)
            stored_msg = await self.js.get_msg(TASKS_STREAM, advisory.stream_seq)
            if store is None or stored_msg.data is None:
                return
            task = decode(stored_msg.data, Task, max_bytes=MAX_TASK_PAYLOAD_BYTES)
            # As stored, never admitted: the submit token must not reach the letter.
            task = msgspec.structs.replace(task, token=None)
            stored, _ = await store.claim(task, self.name)
            if not stored.record.final:
                why = f"delivered {advisory.deliveries} times without finishing (max_deliver)"
                await self._bury(task, stored, why, must_store=False)
            await self.js.delete_msg(TASKS_STREAM, advisory.stream_seq)
        except (msgspec.DecodeError, ContractError) as exc:
            log.warning("max-deliveries advisory not handled: %s", exc)
        except STORE_ERRORS as exc:
            # Gone already (another controller handled it) or the store is away.
            log.info("max-deliveries advisory: %s", exc)

    # --- progress and events ---------------------------------------------------

    async def _on_progress(self, msg: Msg) -> None:
        try:
            envelope = decode(msg.data, _ProgressEvent, max_bytes=_MAX_PROGRESS)
            progress = msgspec.convert(envelope.data, TaskProgress, strict=False)
        except (ContractError, msgspec.ValidationError):
            self.counts["bad_progress"] += 1
            return
        run = self.runs.get(progress.task_id)
        if run is None or run.attempt != progress.attempt or run.agent_id != progress.agent_id:
            return
        run.last_heard = asyncio.get_running_loop().time()
        if progress.fraction is not None or progress.message:
            run.progress = (progress.fraction, progress.message)
        with contextlib.suppress(nats.errors.Error):
            await run.msg.in_progress()

    async def _event(self, kind: str, record: TaskRecord, *, must_store: bool = True) -> None:
        """Publish the task's event into EVENTS and wait for JetStream to store it.

        Called before the task's ack or term: a final event (``task.completed``,
        ``task.dead``) that could not be stored raises, so the message goes back
        and its redelivery, finding the final record, publishes it again. An
        acknowledged task therefore always has its event stored, also across the
        loss of a NATS server. ``must_store=False`` (an attempt's
        ``task.failed``, the max-deliveries path) only counts a failure.
        """
        subject, payload, headers = self.event_message(kind, record)
        if not self._events_stream:
            # No EVENTS stream (a bare dispatcher): nothing would store it anyway.
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(subject, payload, headers=headers)
            return
        try:
            await self.js.publish(
                subject, payload, timeout=self.settings.event_timeout, headers=headers
            )
        except (nats.errors.Error, TimeoutError) as exc:
            self.not_stored(headers["Nats-Msg-Id"], exc, must_store=must_store)

    def not_stored(self, event_id: str, exc: BaseException, *, must_store: bool = True) -> None:
        self.counts["events_not_stored"] += 1
        if must_store:
            raise EventNotStored(f"event {event_id} not stored: {exc!r}") from exc
        log.info("event %s not stored: %r", event_id, exc)

    @property
    def stores_events(self) -> bool:
        """True when EVENTS exists, so a final event must be confirmed stored."""
        return self._events_stream

    def event_message(self, kind: str, record: TaskRecord) -> tuple[str, bytes, dict[str, str]]:
        """The task's CloudEvent: subject, body and headers.

        The event id is fixed per task and outcome (per attempt for
        ``task.failed``) and doubles as ``Nats-Msg-Id``, so publishing it again
        stores it once (listeners on the subject may see it twice).
        """
        data: dict[str, Any] = {
            "task_id": record.id,
            "type": record.type,
            "state": record.state.value,
            "attempts": record.attempts,
            "agent_id": record.agent_id,
            "node_id": record.node_id,
        }
        if record.error and kind != "task.completed":
            data["error"] = record.error
        duration = _seconds(record.started_at, record.finished_at)
        if duration is not None:
            data["duration"] = round(duration, 6)
        actor = record.submitted_by or None
        event_id = f"{record.id}.{kind}"
        if kind == "task.failed":
            event_id += f".{record.attempts}"
        event = make_event(
            kind, source=self.source, subject=record.id, data=data, actor=actor, event_id=event_id
        )
        return subjects.event(kind), encode(event), {"Nats-Msg-Id": event_id}


def _on_node(node_id: str) -> Callable[[TaskRecord], TaskRecord]:
    """The node a one-shot ran on, once known (records start with none)."""

    def change(record: TaskRecord) -> TaskRecord:
        if record.state is not TaskState.RUNNING:
            return record
        return msgspec.structs.replace(record, node_id=node_id, updated_at=utc_now())

    return change


def _progress_change(fraction: float | None, message: str) -> Callable[[TaskRecord], TaskRecord]:
    return lambda record: with_progress(record, fraction, message)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()
