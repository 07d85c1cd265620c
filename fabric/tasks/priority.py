"""Task priority as a dispatcher can honour it: pure, so tested without a server.

JetStream has no priorities: one durable consumer delivers a work queue in
stream order. What a dispatcher *can* order is the tasks it holds at once,
and that is what ``Task.priority`` (0..9, higher first, default 5) means:

* **Slots.** A task that waits for a slot (its type's concurrency limit, or
  every agent serving its type busy) queues in a :class:`SlotQueue`. When a
  slot frees, the best-ranked waiter of that type takes it: higher priority
  first, then first come (fetch order) within one priority. A task just
  fetched that finds a free slot still queues behind better-ranked waiters
  of its type, and goes ahead of worse-ranked ones.
* **Fetches.** The messages of one fetch are started best first
  (:func:`by_priority`), so when a batch holds more tasks than free slots
  the higher ones get them.

What it does not promise: an order across task types (they compete for
different slots), across dispatchers (each controller orders what it holds),
or for tasks still in the stream behind a full dispatcher (``max_inflight``).
A task that waits longer than ``busy_hold`` goes back to the queue and is
ranked again when it is fetched again.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["SlotQueue", "Ticket", "by_priority", "rank"]

T = TypeVar("T")


def rank(priority: int, arrival: int) -> tuple[int, int]:
    """Sort key of a waiting task: smaller goes first (higher priority, then earlier)."""
    return (-priority, arrival)


def by_priority(items: Iterable[T], priority: Callable[[T], int]) -> list[T]:
    """``items`` highest priority first; equal priorities keep their order (stable)."""
    return sorted(items, key=lambda item: -priority(item))


@dataclass(frozen=True, slots=True, order=True)
class Ticket:
    """One waiting task's place: its key orders it within its task type."""

    key: tuple[int, int, int]
    """(-priority, arrival, a tiebreak): two tickets are never equal."""
    task_type: str = field(compare=False)


class SlotQueue:
    """The tasks one dispatcher holds waiting for a slot, per task type, best first."""

    def __init__(self) -> None:
        self._by_type: dict[str, list[Ticket]] = {}
        self._tiebreak = itertools.count()

    def join(self, task_type: str, priority: int, arrival: int) -> Ticket:
        ticket = Ticket((*rank(priority, arrival), next(self._tiebreak)), task_type)
        bisect.insort(self._by_type.setdefault(task_type, []), ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """Forget ``ticket`` (no-op when it left already)."""
        waiting = self._by_type.get(ticket.task_type)
        if not waiting:
            return
        i = bisect.bisect_left(waiting, ticket)
        if i < len(waiting) and waiting[i] == ticket:
            del waiting[i]
        if not waiting:
            del self._by_type[ticket.task_type]

    def first(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` is the best-ranked waiter of its type (it may take a slot)."""
        waiting = self._by_type.get(ticket.task_type)
        return bool(waiting) and waiting[0] == ticket

    def ahead(self, ticket: Ticket) -> int:
        """How many waiters of its type rank before ``ticket``."""
        return bisect.bisect_left(self._by_type.get(ticket.task_type, []), ticket)

    def waiting(self, task_type: str | None = None) -> int:
        if task_type is not None:
            return len(self._by_type.get(task_type, ()))
        return sum(len(w) for w in self._by_type.values())
