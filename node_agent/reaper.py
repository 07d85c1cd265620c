"""The one owner of ``waitpid`` in the node agent.

The node agent makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``),
so descendants whose parent dies are re-parented to it instead of init.
:class:`ChildReaper` handles SIGCHLD through the event loop and reaps every
exited child with ``waitpid(-1, WNOHANG)``: a pid registered with
:meth:`ChildReaper.watch` gets its exit status through a future; any other
pid (an orphaned grandchild) is reaped and counted, never left a zombie.

Because this reaper takes every child, nothing else in the process may
wait for children: never ``asyncio.create_subprocess_*`` (its child watcher
would race us), and a ``subprocess.Popen`` must be registered here right
after it returns, with no ``await`` in between. The SIGCHLD callback runs
on the loop, so it cannot slip between ``Popen()`` and ``watch()``.

Processes that are not our children (re-adopted after a node agent restart)
cannot be waited for; :meth:`ChildReaper.watch_foreign` uses a pidfd that
becomes readable when the process exits (exit status unknown), and
:meth:`ChildReaper.poll_foreign` is the fallback for kernels without
pidfd, called on the metrics tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass

import psutil

__all__ = ["ChildReaper", "ExitInfo", "become_subreaper", "same_process", "signal_name"]

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a process ended; ``code`` and ``signal`` are None when unknown."""

    pid: int
    code: int | None = None
    signal: str | None = None

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def become_subreaper() -> bool:
    """Best effort ``prctl(PR_SET_CHILD_SUBREAPER, 1)``; True when it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _decode(pid: int, status: int) -> ExitInfo:
    if os.WIFSIGNALED(status):
        return ExitInfo(pid, None, signal_name(os.WTERMSIG(status)))
    return ExitInfo(pid, os.waitstatus_to_exitcode(status), None)


@dataclass(slots=True)
class _Foreign:
    future: asyncio.Future[ExitInfo]
    create_time: float
    fd: int | None


class ChildReaper:
    """Reaps every child on SIGCHLD and resolves the futures of watched pids."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: dict[int, asyncio.Future[ExitInfo]] = {}
        self._foreign: dict[int, _Foreign] = {}
        self.orphans_reaped = 0
        self.subreaper = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.subreaper = become_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        # asyncio's wake-up socket fills after a few hundred pending signals (each
        # one-byte write costs a whole buffer), e.g. 1,000 agents stopped at once;
        # a dropped SIGCHLD byte loses nothing since every pass reaps all children,
        # so the "wakeup fd full" warning is only noise.
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
        # Children that exited before the handler existed sent their SIGCHLD to nobody.
        self.reap()

    def close(self) -> None:
        if self._loop is None:
            return
        self._loop.remove_signal_handler(signal.SIGCHLD)
        for pid in list(self._foreign):
            self._drop_foreign(pid)
        for fut in self._watched.values():
            fut.cancel()
        self._watched.clear()
        self._loop = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("ChildReaper.start() was not called")
        return self._loop

    def watch(self, pid: int) -> asyncio.Future[ExitInfo]:
        """Future for a child's exit. Call right after spawning, before any await."""
        fut = self._watched.get(pid)
        if fut is None:
            fut = self._require_loop().create_future()
            self._watched[pid] = fut
        # The child may already be gone; a pass costs one syscall when nothing is.
        self.reap()
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = _decode(pid, status)
            fut = self._watched.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(info)
            elif pid in self._foreign:
                # A re-adopted process that was re-parented to us: now we know its status.
                self._resolve_foreign(pid, info)
            else:
                self.orphans_reaped += 1

    # -- processes that are not our children -------------------------------------------

    def watch_foreign(self, pid: int, create_time: float) -> asyncio.Future[ExitInfo]:
        """Future for the exit of a process we did not spawn (status unknown)."""
        loop = self._require_loop()
        existing = self._foreign.get(pid)
        if existing is not None:
            return existing.future
        fut: asyncio.Future[ExitInfo] = loop.create_future()
        fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            fd = os.pidfd_open(pid)
        self._foreign[pid] = _Foreign(fut, create_time, fd)
        if fd is not None:
            loop.add_reader(fd, self._foreign_exited, pid)
        # The pid may have been reused or gone before the pidfd was opened.
        if not same_process(pid, create_time):
            self._foreign_exited(pid)
        return fut

    def poll_foreign(self) -> None:
        """Fallback check of foreign processes without a pidfd (call on a tick)."""
        for pid, entry in list(self._foreign.items()):
            if entry.fd is None and not same_process(pid, entry.create_time):
                self._foreign_exited(pid)

    def _foreign_exited(self, pid: int) -> None:
        # If it was re-parented to us (we are a subreaper) its status is ours to take.
        info = ExitInfo(pid)
        with contextlib.suppress(ChildProcessError):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                info = _decode(pid, status)
        self._resolve_foreign(pid, info)

    def _resolve_foreign(self, pid: int, info: ExitInfo) -> None:
        entry = self._drop_foreign(pid)
        if entry is not None and not entry.future.done():
            entry.future.set_result(info)

    def _drop_foreign(self, pid: int) -> _Foreign | None:
        entry = self._foreign.pop(pid, None)
        if entry is not None and entry.fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(entry.fd)
            os.close(entry.fd)
        return entry

    @property
    def watched(self) -> int:
        return len(self._watched) + len(self._foreign)


def same_process(pid: int, create_time: float | None) -> bool:
    """Same process still there and not a zombie (pid reuse is told by create time)."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if create_time is not None and abs(proc.create_time() - create_time) >= 0.01:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
