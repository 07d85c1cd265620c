"""The batched lane: how a dispatcher runs a fetched batch of fresh tasks.

The one-by-one path (:class:`~fabric.tasks.dispatch.Dispatcher`) costs a
request/reply and three stored writes, each with its own round trip, per
task; at a few thousand tasks a second the controller's one Python core is
spent on round trips. A task seen for the first time, with a slot free on a
capable agent, takes this lane instead, which does the same steps for many
tasks at once::

    fetched batch ─▶ admit each ─▶ wait here for a slot (best first, busy_hold)
      ─▶ which have a record already? (one batch direct get on the records
         stream; those take the one-by-one path, which reads and decides)
      ─▶ one TaskBatch per agent on agents.<id>.tasks (reply: this lane's inbox)
      ◀─ TaskResults, several per message as they finish
      ├─ succeeded ─▶ record ``succeeded`` (expecting no record, or the
      │              ``running`` one) ─▶ events.task.completed stored ─▶ ack
      └─ anything else, or a record that changed meanwhile ─▶ Dispatcher.settle,
                       exactly as the one-by-one path settles it

A short task gets one record write, when it ends; one still running after
``running_after`` (or reporting progress) gets its ``running`` record then,
so ``fabric task get`` shows what runs for a while. Writes go through
:class:`~fabric.tasks.pipe.StoredPublisher`: each is a stored publish
whose PubAck comes back on one shared subscription, and the results that
arrive together are written together. Every guarantee of the one-by-one
path holds: a task is acked only after its final record and its event are
stored; a record is only written at the revision it was read at (an absent
record counts as revision 0); a run whose agent leaves the view, goes
silent for ``ack_wait`` or passes its deadline goes back at once (the watch
below, every ``watch_every``); in-progress keeps the message alive.
Redeliveries, retries, ``exec`` tasks and tasks past their deadline never
take the lane: they need the record read first.

The lookup is a read, and with replicas it may be answered by a follower a
moment behind: the record writes that follow name the revision they expect,
so a record written meanwhile is never overwritten, only (at worst) the
handler of a task submitted again after its duplicate window runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from fabric.cancelled import raise_if_cancelled
from fabric.tasks.agents import Candidate
from fabric.tasks.pipe import StoredPublisher, WriteRefused, Written
from fabric.tasks.priority import Ticket, rank
from fabric.tasks.records import (
    Stored,
    TaskRecord,
    encode_record,
    new_record,
    started,
    succeeded,
    with_progress,
)
from fabric.tasks.runs import Back, Run
from fabric.tasks.stream import RECORDS_BUCKET
from schemas import subjects
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorReply
from schemas.task import (
    BATCH_HEADER,
    EXEC_TASK_TYPE,
    MAX_BATCH_ASSIGNMENTS,
    Task,
    TaskAssignment,
    TaskBatch,
    TaskOutcome,
    TaskResult,
    TaskResults,
)

if TYPE_CHECKING:
    from fabric.tasks.dispatch import Dispatcher

__all__ = ["Lane"]

log = logging.getLogger(__name__)

_EXPECT = "Nats-Expected-Last-Subject-Sequence"
_MAX_BATCH_BYTES = 512 * 1024
"""Assignments per message are cut below this (server max_payload is 1 MiB+)."""
_MAX_RESULTS_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _LaneRun:
    run: Run
    stored: Stored
    agent: Candidate
    batch: int
    timeout_at: float
    kept_at: float
    since: float
    """Loop time the task was handed out."""
    written: bool = False
    """The ``running`` record is stored (else ``stored.revision`` is 0: none yet)."""
    writing: bool = False
    """Its write is in flight, or was refused (a record is there): not again."""


@dataclass(slots=True)
class _Lookup:
    """Which of some task ids have a record, as a batch direct get answers."""

    done: asyncio.Future[set[str]]
    found: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Waiting:
    """A fresh task waiting here for a slot; ranked like the dispatcher's waiters."""

    msg: Msg
    task: Task
    arrival: int
    ticket: Ticket
    since: float

    def __lt__(self, other: _Waiting) -> bool:
        return rank(self.task.priority, self.arrival) < rank(other.task.priority, other.arrival)


@dataclass(slots=True)
class _Sent:
    agent_id: str
    runs: dict[str, _LaneRun] = field(default_factory=dict)


class Lane:
    """Runs fresh tasks in batches for one :class:`Dispatcher`; see the module docstring."""

    def __init__(self, dispatcher: Dispatcher, pipe: StoredPublisher) -> None:
        self.d = dispatcher
        self.pipe = pipe
        """Where records and events are written (one PubAck subscription for both)."""
        self.inbox = ""
        self._sub: object | None = None
        self._batches: dict[int, _Sent] = {}
        self._numbers = itertools.count(1)
        self._tg: asyncio.TaskGroup | None = None
        self.live: dict[str, _LaneRun] = {}
        self._waiting: dict[str, list[_Waiting]] = {}
        self._lookups: dict[int, _Lookup] = {}
        self._pump_soon = False
        self._wins: list[tuple[_LaneRun, TaskResult]] = []
        self._settling = False

    # --- set-up ------------------------------------------------------------------

    async def start(self) -> None:
        nc = self.d.nc
        await self.pipe.start()
        self.inbox = nc.new_inbox()
        self._sub = await nc.subscribe(f"{self.inbox}.>", cb=self._on_reply)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        await self.pipe.stop()

    # --- intake ------------------------------------------------------------------

    async def take(self, msgs: list[Msg], tg: asyncio.TaskGroup) -> None:
        """Route a fetched batch (each message counted held already)."""
        d = self.d
        self._tg = tg
        now = utc_now()
        for msg in msgs:
            arrival = d.arrive()
            try:
                task = await d.intake(msg)
            except Exception as exc:
                await d.give_back(msg, exc)
                await d.let_go()
                continue
            if task is None:
                await d.let_go()
                continue
            if not self._fits(msg, task, now):
                tg.create_task(d._guarded(msg, arrival, task))
                continue
            ticket = d.slots.join(task.type, task.priority, arrival)
            waiting = _Waiting(msg, task, arrival, ticket, asyncio.get_running_loop().time())
            heapq.heappush(self._waiting.setdefault(task.type, []), waiting)
        self._pump()

    def _fits(self, msg: Msg, task: Task, now: datetime) -> bool:
        """May this task take the lane at all (see the module docstring)?"""
        if msg.metadata.num_delivered != 1 or task.retry:
            return False
        if self.d.batch is not None and task.type == EXEC_TASK_TYPE:
            return False
        return task.deadline is None or task.deadline > now

    def _pump(self) -> None:
        """Start every waiting task that has a slot now, best first per type."""
        d = self.d
        tg = self._tg
        if tg is None:
            return
        group: list[tuple[_Waiting, Candidate]] = []
        for task_type, heap in list(self._waiting.items()):
            while heap:
                first = heap[0]
                taken = d.take_slot(first.task, first.msg, first.ticket)
                if isinstance(taken, str):
                    break  # busy: it and those ranked after it keep waiting
                heapq.heappop(heap)
                d.slots.leave(first.ticket)
                if isinstance(taken, Candidate):
                    group.append((first, taken))
                else:
                    # No agent serves the type (any more): the one-by-one path
                    # records why and lets the task come back later.
                    tg.create_task(self._not_now(first, *taken))
            if not heap:
                del self._waiting[task_type]
        if group:
            tg.create_task(self._start(group))

    async def _not_now(self, waiting: _Waiting, reason: str, delay: float) -> None:
        d = self.d
        try:
            await d.not_now(waiting.msg, waiting.task, None, reason, delay)
        except Exception as exc:
            await d.give_back(waiting.msg, exc)
        finally:
            await d.let_go()

    def _expire(self, now: float) -> None:
        """Tasks that waited ``busy_hold`` for a slot go back to the queue.

        Waiting here sends no in-progress, so the wait is also kept well inside
        a third of the ack wait (JetStream would redeliver the task meanwhile)."""
        hold = min(self.d.settings.busy_hold, self.d.ack_wait / 3 * 0.9)
        tg = self._tg
        if tg is None:
            return
        for task_type, heap in list(self._waiting.items()):
            late = [w for w in heap if now - w.since >= hold]
            if not late:
                continue
            kept = [w for w in heap if now - w.since < hold]
            heapq.heapify(kept)
            if kept:
                self._waiting[task_type] = kept
            else:
                del self._waiting[task_type]
            for waiting in late:
                reason = self.d.take_slot(waiting.task, waiting.msg, waiting.ticket)
                self.d.slots.leave(waiting.ticket)
                if isinstance(reason, Candidate):
                    # A slot freed since the last pump: not late after all.
                    tg.create_task(self._start([(waiting, reason)]))
                    continue
                why = reason if isinstance(reason, str) else reason[0]
                tg.create_task(self._not_now(waiting, why, self.d.settings.handback_delay))

    # --- starting ----------------------------------------------------------------

    async def _start(self, group: list[tuple[_Waiting, Candidate]]) -> None:
        d = self.d
        tg = self._tg
        assert tg is not None
        existing = await self._records_of([w.task.id for w, _ in group])
        now = asyncio.get_running_loop().time()
        by_agent: dict[str, list[_LaneRun]] = {}
        for w, agent in group:
            task = w.task
            if existing is None or task.id in existing:
                # A record exists (or nobody could say): the one-by-one path
                # reads it and decides.
                d.release(agent.agent_id, task.type)
                tg.create_task(d._guarded(w.msg, w.arrival, task))
                continue
            record = started(new_record(task, d.name), agent.agent_id, agent.node_id, d.name)
            run = Run(task, w.msg, agent.agent_id, 1, now)
            timeout = d.settings.run_timeout
            if task.deadline is not None:
                timeout = max(0.1, min(timeout, (task.deadline - utc_now()).total_seconds()))
            lane_run = _LaneRun(run, Stored(record, 0), agent, 0, now + timeout, now, now)
            d.runs[task.id] = run
            self.live[task.id] = lane_run
            by_agent.setdefault(agent.agent_id, []).append(lane_run)
        if len(by_agent) < len(group):
            await d._notify()  # slots given back
        for agent_id, runs in by_agent.items():
            await self._send(agent_id, runs)

    async def _records_of(self, task_ids: list[str]) -> set[str] | None:
        """The ids among ``task_ids`` that have a record (one batch direct get per
        256), or None when the store did not answer in time."""
        found: set[str] = set()
        for start in range(0, len(task_ids), _MAX_LOOKUP):
            chunk = task_ids[start : start + _MAX_LOOKUP]
            number = next(self._numbers)
            lookup = _Lookup(asyncio.get_running_loop().create_future())
            self._lookups[number] = lookup
            request = {"multi_last": [_record_subject(i) for i in chunk], "batch": len(chunk)}
            try:
                await self.d.nc.publish(
                    f"$JS.API.DIRECT.GET.KV_{RECORDS_BUCKET}",
                    msgspec.json.encode(request),
                    reply=f"{self.inbox}.g.{number}",
                )
                found |= await asyncio.wait_for(lookup.done, self.d.settings.event_timeout)
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("task records lookup failed: %r", exc)
                return None
            finally:
                del self._lookups[number]
        return found

    async def _write_running(self, lane_run: _LaneRun) -> None:
        """Store the ``running`` record of a task that runs for a while (a short one
        is only ever written when it ends)."""
        run = lane_run.run
        record = lane_run.stored.record
        if run.progress is not None:
            fraction, text = run.progress
            run.progress = None
            record = with_progress(record, fraction, text)
        try:
            written = await self.pipe.write(
                _record_subject(record.id), encode_record(record), {_EXPECT: "0"}
            )
        except WriteRefused as exc:
            # A record is there after all: its end settles it the careful way.
            log.info("task %s: running record not written: %r", record.id, exc)
            return
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("task %s: running record not written yet: %r", record.id, exc)
            lane_run.writing = False  # the next watch tries again
            return
        if self.live.get(record.id) is lane_run and not lane_run.written:
            lane_run.stored = Stored(record, written.seq)
            lane_run.written = True

    async def _send(self, agent_id: str, runs: list[_LaneRun]) -> None:
        ack_wait = self.d.ack_wait
        chunk: list[_LaneRun] = []
        size = 0
        for lane_run in runs:
            weight = len(lane_run.run.msg.data) + 256
            if chunk and (len(chunk) >= MAX_BATCH_ASSIGNMENTS or size + weight > _MAX_BATCH_BYTES):
                await self._send_chunk(agent_id, chunk, ack_wait)
                chunk, size = [], 0
            chunk.append(lane_run)
            size += weight
        if chunk:
            await self._send_chunk(agent_id, chunk, ack_wait)

    async def _send_chunk(self, agent_id: str, chunk: list[_LaneRun], ack_wait: float) -> None:
        number = next(self._numbers)
        sent = _Sent(agent_id)
        for lane_run in chunk:
            lane_run.batch = number
            sent.runs[lane_run.run.task.id] = lane_run
        self._batches[number] = sent
        batch = TaskBatch(
            assignments=[
                TaskAssignment(task=r.run.task, attempt=r.run.attempt, ack_wait=ack_wait)
                for r in chunk
            ]
        )
        try:
            await self.d.nc.publish(
                subjects.agent_tasks(agent_id),
                encode(batch),
                reply=f"{self.inbox}.r.{number}",
                headers={BATCH_HEADER: "1"},
            )
        except nats.errors.Error as exc:
            back = Back(f"could not reach agent {agent_id}: {exc}", counts=False)
            for lane_run in chunk:
                self._finish(lane_run, back)

    # --- results -----------------------------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        kind, _, tail = msg.subject[len(self.inbox) + 1 :].partition(".")
        try:
            number = int(tail)
        except ValueError:
            return
        if kind == "r":
            await self._on_results(msg, number)
        elif kind == "g":
            self._on_lookup(msg, number)

    def _on_lookup(self, msg: Msg, number: int) -> None:
        lookup = self._lookups.get(number)
        if lookup is None or lookup.done.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status in ("204", "404"):  # end of the batch; no record at all
            lookup.done.set_result(lookup.found)
        elif status is not None:
            lookup.done.set_exception(nats.errors.Error(f"direct get: {status}"))
        else:
            subject = headers.get("Nats-Subject", "")
            lookup.found.add(subject[len(_RECORD_PREFIX) :])

    async def _on_results(self, msg: Msg, number: int) -> None:
        sent = self._batches.get(number)
        if sent is None:
            return
        d = self.d
        if msg.headers and msg.headers.get("Status") == "503":
            back = Back(f"agent {sent.agent_id} is not taking tasks", counts=False, shun=True)
            self._finish_all(sent, back)
            return
        try:
            answer = decode(msg.data, TaskResults, max_bytes=_MAX_RESULTS_BYTES)
        except ContractError as exc:
            try:
                refusal = decode(msg.data, ErrorReply, max_bytes=_MAX_RESULTS_BYTES)
                why = f"{refusal.code.value}: {refusal.message}"
            except ContractError:
                why = f"bad reply from agent {sent.agent_id}: {exc}"
            d.counts["bad_results"] += 1
            self._finish_all(sent, Back(why, counts=True))
            return
        wins: list[tuple[_LaneRun, TaskResult]] = []
        for result in answer.results:
            lane_run = sent.runs.get(result.task_id)
            if (
                lane_run is None
                or result.attempt != lane_run.run.attempt
                or result.agent_id != sent.agent_id
            ):
                d.counts["bad_results"] += 1
                continue
            won = result.outcome is TaskOutcome.SUCCEEDED
            # A success keeps its slot until it is acked: the tasks a controller
            # that dies could have run without storing them stay within its
            # slots (agent_limit per agent), not slots plus what was settling.
            if not self._end(lane_run, release=not won):
                continue
            if won:
                wins.append((lane_run, result))
            else:
                self._spawn(self._settle_one(lane_run, result))
        if wins:
            self._wins.extend(wins)
            if not self._settling:
                self._settling = True
                self._spawn(self._settle_wins())

    async def _settle_wins(self) -> None:
        """Settle successes, all that came in since the last round in one round:
        under load each round carries more, and costs less per task."""
        try:
            while self._wins:
                wins, self._wins = self._wins, []
                await self._succeed_many(wins)
        finally:
            self._settling = False

    def _finish_all(self, sent: _Sent, outcome: Back) -> None:
        for lane_run in list(sent.runs.values()):
            self._finish(lane_run, outcome)

    def _finish(self, lane_run: _LaneRun, outcome: TaskResult | Back) -> None:
        """The run is over (once): free its slot and settle it."""
        if self._end(lane_run):
            self._spawn(self._settle_one(lane_run, outcome))

    def _end(self, lane_run: _LaneRun, *, release: bool = True) -> bool:
        """Forget a run and (``release``) free its slot; False when it had ended
        already."""
        task = lane_run.run.task
        if self.live.get(task.id) is not lane_run:
            return False
        del self.live[task.id]
        sent = self._batches.get(lane_run.batch)
        if sent is not None:
            sent.runs.pop(task.id, None)
            if not sent.runs:
                del self._batches[lane_run.batch]
        d = self.d
        if d.runs.get(task.id) is lane_run.run:
            del d.runs[task.id]
        if release:
            d.release(lane_run.agent.agent_id, task.type)
            self.poke()
        return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        tg = self._tg
        assert tg is not None
        tg.create_task(work)

    def poke(self) -> None:
        """A slot may have freed: pump once this loop turn, however many freed."""
        if self._waiting and not self._pump_soon:
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._pumped)

    def _pumped(self) -> None:
        self._pump_soon = False
        self._pump()

    async def _settle_one(self, lane_run: _LaneRun, outcome: TaskResult | Back) -> None:
        """Settle one run the one-by-one path's way (Dispatcher.settle)."""
        d = self.d
        run = lane_run.run
        try:
            await d._notify()
            await d.settle(run.msg, run.task, lane_run.stored, outcome, run.attempt, lane_run.agent)
        except Exception as exc:
            await d.give_back(run.msg, exc)
        finally:
            await d.let_go()

    async def _succeed_many(self, wins: list[tuple[_LaneRun, TaskResult]]) -> None:
        """Final records, then events, then acks, for results that came together.

        A record that changed meanwhile (another dispatcher, a running record
        being written) is settled the careful way; a write that failed sends its
        task back (its redelivery finds the final record, if it was stored, and
        says its event again)."""
        d = self.d
        settled = 0
        try:
            await d._notify()
            records = [succeeded(lane_run.stored.record, result) for lane_run, result in wins]
            written = await self.pipe.write_many(
                [
                    (
                        _record_subject(record.id),
                        encode_record(record),
                        {_EXPECT: str(lane_run.stored.revision)},
                    )
                    for (lane_run, _), record in zip(wins, records, strict=True)
                ]
            )
            final: list[tuple[_LaneRun, TaskRecord]] = []
            for (lane_run, result), record, outcome in zip(wins, records, written, strict=True):
                if isinstance(outcome, Written):
                    final.append((lane_run, record))
                elif isinstance(outcome, WriteRefused) and outcome.wrong_last_sequence:
                    settled += 1  # its own settle lets it go
                    self._spawn(self._settle_one(lane_run, result))
                else:
                    settled += 1
                    await d.give_back(lane_run.run.msg, outcome)
                    await d.let_go()
            events = [d.event_message("task.completed", record) for _, record in final]
            if d.stores_events:
                stored = await self.pipe.write_many(events)
            else:
                stored = []
                for subject, payload, headers in events:
                    with contextlib.suppress(nats.errors.Error):
                        await d.nc.publish(subject, payload, headers=headers)
                    stored.append(Written(0))
            for (lane_run, _), event, outcome in zip(final, events, stored, strict=True):
                msg = lane_run.run.msg
                if isinstance(outcome, Exception):
                    # Counted and logged as the one-by-one path does; the task goes
                    # back, and its redelivery says the event again.
                    d.not_stored(event[2]["Nats-Msg-Id"], outcome, must_store=False)
                    await d.give_back(msg, outcome)
                    continue
                d.counts["succeeded"] += 1
                await msg.ack()
        except Exception as exc:
            # The connection went: every task not acked yet comes back by itself.
            log.warning("lane: %d results not settled: %r", len(wins) - settled, exc)
        finally:
            for lane_run, _ in wins:
                d.release(lane_run.agent.agent_id, lane_run.run.task.type)
            self.poke()
            await d.let_go(len(wins) - settled)

    # --- the watch ---------------------------------------------------------------

    async def watch_forever(self) -> None:
        """Keep running lane tasks alive and send back those whose agent is gone."""
        d = self.d
        loop = asyncio.get_running_loop()
        keep_every = d.ack_wait / 3
        running_after = d.settings.running_after
        while True:
            raise_if_cancelled()
            await asyncio.sleep(min(keep_every, d.settings.watch_every))
            now = loop.time()
            if self._waiting:
                # Slots also free up outside this lane (the one-by-one path).
                self._pump()
                self._expire(now)
            if not self.live:
                continue
            view = d.agents()
            for lane_run in list(self.live.values()):
                run = lane_run.run
                if run.agent_id not in view:
                    why = f"agent {run.agent_id} stopped running it"
                    self._finish(lane_run, Back(why, counts=True, shun=True))
                elif now - run.last_heard > d.ack_wait:
                    why = f"agent {run.agent_id} went silent"
                    self._finish(lane_run, Back(why, counts=True, shun=True))
                elif now >= lane_run.timeout_at:
                    why = f"no result from agent {run.agent_id} in time"
                    self._finish(lane_run, Back(why, counts=True))
                else:
                    if now - lane_run.kept_at >= keep_every * 0.9:
                        lane_run.kept_at = now
                        with contextlib.suppress(nats.errors.Error):
                            await run.msg.in_progress()
                    if self._tg is None:
                        continue
                    if not lane_run.written:
                        due = run.progress is not None or now - lane_run.since >= running_after
                        if due and not lane_run.writing:
                            lane_run.writing = True
                            self._tg.create_task(self._write_running(lane_run))
                    elif run.progress is not None:
                        self._tg.create_task(self._save_progress(lane_run))

    async def _save_progress(self, lane_run: _LaneRun) -> None:
        run = lane_run.run
        progress, run.progress = run.progress, None
        store = self.d.store
        if progress is None or store is None:
            return
        with contextlib.suppress(Exception):
            fraction, text = progress
            lane_run.stored = await store.save(
                lane_run.stored, lambda r: with_progress(r, fraction, text)
            )


_RECORD_PREFIX = f"$KV.{RECORDS_BUCKET}."
_MAX_LOOKUP = 256


def _record_subject(task_id: str) -> str:
    return _RECORD_PREFIX + task_id
