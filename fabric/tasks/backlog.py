"""The task backlog per type: what `fabric top`, ``fabric.discover`` (what=tasks)
and the Prometheus metrics show.

Two sources, one function each:

* :func:`queue_backlog` - tasks stored in stream ``TASKS`` and not yet acked,
  per ``tasks.<type>.queue`` subject (one ``STREAM.INFO`` call with a subject
  filter; work-queue retention means stored = not acked).
* :class:`RecordCounts` - how many of them run and how many wait, and why,
  from the task records (``fabric_tasks``): a watch that keeps only the
  records not final yet, so its memory is the live tasks', not the last
  seven days'. Fleet-wide: every dispatcher writes the records. A task a
  dispatcher's batched lane runs gets a ``running`` record only once it has
  run for ``DispatchSettings.running_after`` (1 s) or reported progress, so
  "running" counts the tasks that run for a while; shorter ones show as
  stored and not yet acked until they end.

A controller starts its :class:`RecordCounts` on the first ``what=tasks``
discovery, not at start: the watch receives every record write, which a
controller nobody asks about the backlog does not need to pay for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from fabric.cancelled import raise_if_cancelled
from fabric.tasks.stream import RECORDS_BUCKET, TASKS_STREAM
from schemas import subjects
from schemas.discovery import TaskBacklog
from schemas.errors import ContractError

__all__ = ["RecordCounts", "backlog_report", "queue_backlog"]

log = logging.getLogger(__name__)

_MAX_REASONS = 32
_FINAL = frozenset({"succeeded", "dead", "refused"})


async def queue_backlog(js: JetStreamContext, *, within: float = 1.0) -> dict[str, int] | None:
    """Messages per task type in stream TASKS (not yet acked); None when unknown
    (no task stream yet, or JetStream busy)."""
    try:
        async with asyncio.timeout(within):
            info = await js.stream_info(TASKS_STREAM, subjects_filter=subjects.TASK_QUEUES)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return None
    counts: dict[str, int] = {}
    for subject, n in (info.state.subjects or {}).items():
        with contextlib.suppress(ContractError):
            parsed = subjects.parse_subject(subject)
            if parsed.id is not None:
                counts[parsed.id] = n
    return counts


class _Light(msgspec.Struct):
    """The three fields of a task record the counts need (the rest is not decoded)."""

    type: str
    state: str
    waiting: str = ""
    attempts: int = 0


_light = msgspec.json.Decoder(_Light)


@dataclass(frozen=True, slots=True)
class _Live:
    type: str
    running: bool
    reason: str


def _reason(record: _Light) -> str:
    if record.waiting:
        return record.waiting
    if record.state == "failed":
        return "retrying after a failed attempt"
    return "queued"


class RecordCounts:
    """Running and waiting tasks per type, kept by a watch of the records bucket."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.live: dict[str, _Live] = {}
        self.ready = asyncio.Event()
        """Set once the records stored when the watch began have been read."""

    def apply(self, key: str, data: bytes | None) -> None:
        """One record write (None or empty: deleted)."""
        if not data:
            self.live.pop(key, None)
            return
        try:
            record = _light.decode(data)
        except msgspec.DecodeError:
            self.live.pop(key, None)
            return
        if record.state in _FINAL:
            self.live.pop(key, None)
        else:
            self.live[key] = _Live(record.type, record.state == "running", _reason(record))

    async def run(self) -> None:
        """Watch until cancelled; a watch that fails is made again."""
        delay = 0.5
        while True:
            raise_if_cancelled()
            try:
                kv = await self.js.key_value(RECORDS_BUCKET)
                watcher = await kv.watchall()
                try:
                    self.live.clear()
                    async for entry in watcher:
                        if entry is None:
                            self.ready.set()  # the stored records are all in
                            continue
                        delay = 0.5
                        deleted = entry.operation in ("DEL", "PURGE")
                        self.apply(entry.key, None if deleted else entry.value)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.info("task record watch: %s; again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def by_type(self) -> dict[str, tuple[int, int, Counter[str]]]:
        """type -> (running, waiting, reasons)."""
        out: dict[str, tuple[int, int, Counter[str]]] = {}
        for live in self.live.values():
            running, waiting, reasons = out.get(live.type, (0, 0, Counter()))
            if live.running:
                running += 1
            else:
                waiting += 1
                reasons[live.reason[:4096]] += 1
            out[live.type] = (running, waiting, reasons)
        return out


def backlog_report(
    stored: dict[str, int], counts: RecordCounts | None, types: set[str] | None = None
) -> list[TaskBacklog]:
    """One :class:`TaskBacklog` per type known to either source, by type name."""
    per_type = counts.by_type() if counts is not None else {}
    out = []
    for task_type in sorted(stored.keys() | per_type.keys()):
        if types and task_type not in types:
            continue
        running, waiting, reasons = per_type.get(task_type, (0, 0, Counter()))
        out.append(
            TaskBacklog(
                type=task_type,
                backlog=stored.get(task_type, 0),
                running=running,
                waiting=waiting,
                reasons=dict(reasons.most_common(_MAX_REASONS)),
            )
        )
    return out
