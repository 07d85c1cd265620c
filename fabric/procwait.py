"""Waiting for a child process to exit without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess

__all__ = ["wait_for_exit"]

_POLL = 0.05  # seconds between checks where pidfd_open is missing


async def wait_for_exit(proc: subprocess.Popen[bytes], limit: float | None) -> int | None:
    """Exit code once ``proc`` has exited (and is reaped), or None after ``limit`` seconds.

    A pidfd becomes readable when the process exits, so the loop is woken by
    the exit itself; kernels without ``pidfd_open`` (before Linux 5.3) are polled.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return await _poll_exit(proc, limit)
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(limit):
            await exited.wait()
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()  # readable pidfd: it has exited, this does not block


async def _poll_exit(proc: subprocess.Popen[bytes], limit: float | None) -> int | None:
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    while proc.poll() is None:
        if deadline is not None and loop.time() >= deadline:
            return None
        await asyncio.sleep(_POLL)
    return proc.returncode
