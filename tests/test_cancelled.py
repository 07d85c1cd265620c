"""A cancel that Python 3.11's ``asyncio.wait_for`` loses is still honoured by
the loops that call :func:`fabric.cancelled.raise_if_cancelled`.

Real asyncio, no NATS: nats-py waits with ``wait_for`` in every request, and
the race is made here on purpose instead of hoped for.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from fabric.cancelled import raise_if_cancelled


async def _forever(checked: bool, turns: list[int]) -> None:
    """A forever-loop around ``wait_for`` (as around a NATS request); its first
    answer arrives in the same loop turn as a cancel of the loop's task."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    while len(turns) < 5:
        if checked:
            raise_if_cancelled()
        turns.append(len(turns))
        answer = loop.create_future()
        loop.call_soon(answer.set_result, None)
        if len(turns) == 1:
            loop.call_soon(me.cancel)
        await asyncio.wait_for(answer, 1)


async def test_a_loop_that_checks_ends_on_the_cancel_wait_for_lost() -> None:
    turns: list[int] = []
    task = asyncio.create_task(_forever(True, turns))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert turns == [0]  # ended before a second request


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for keeps the cancel")
async def test_without_the_check_python_3_11_loses_that_cancel() -> None:
    turns: list[int] = []
    task = asyncio.create_task(_forever(False, turns))
    await task  # no CancelledError: the loop went on as if never cancelled
    assert turns == [0, 1, 2, 3, 4]
    assert task.cancelling() == 1  # what raise_if_cancelled reads


async def test_an_uncancelled_task_runs_on() -> None:
    # asyncio.timeout cancels its task and takes the cancel back when it fires.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
    raise_if_cancelled()  # no CancelledError
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
