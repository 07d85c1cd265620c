"""A cancel that Python 3.11 lost, still honoured by the loops that must end.

``asyncio.wait_for`` in 3.11 drops a cancel that lands in the same loop turn
as the result it waits for: it returns the result and the caller goes on as
if never cancelled (fixed in 3.12, where ``wait_for`` is built on
``asyncio.timeout``). nats-py waits with ``wait_for`` in every request, flush,
pull fetch and ``next_msg``, so a controller told to stop (SIGTERM, a test's
cancel) could, rarely, lose the cancel in one of its forever-loops and never
stop: its TaskGroup waits for that child for good.

The request is not lost everywhere: ``Task.cancelling()`` still counts it
(``wait_for`` never calls ``uncancel``), while ``asyncio.timeout`` and
``TaskGroup`` undo their own. A loop that must end when cancelled calls
:func:`raise_if_cancelled` once per turn.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelled"]


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was cancelled and carries on anyway."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
