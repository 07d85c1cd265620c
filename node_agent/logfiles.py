"""stdout/stderr of each agent: size-rotated files, tail and follow.

Layout: ``<state_dir>/logs/<agent_id>/{stdout,stderr}.log`` with backups
``.1`` (newest) to ``.N``.

Choice: the child writes straight into the file (opened ``O_APPEND``), not
through a pipe relayed by the node agent. That costs the node agent nothing
per line at 1,000 chatty agents, and a stalled node agent can never block a
child on a full pipe. The price is that rotation happens from outside:

- at (re)spawn, a file over ``max_bytes`` is rotated by renaming: free and
  lossless, since no process holds it any more;
- while the agent runs, on the metrics tick, copy-truncate: the file is
  copied to ``.1`` (``sendfile``, in the kernel), including what was
  appended during the copy, then truncated. Because the child writes with
  ``O_APPEND`` its next write lands at the new end (0), not at its old
  offset behind a hole. What the child writes in the microseconds between
  the last copy and the truncate is lost; logrotate's copytruncate has the
  same window, and renaming instead would let a long-running child grow the
  renamed file without bound.

``follow`` polls on the caller's interval, which is enough for ``fabric
logs -f``; publishing lines on NATS can build on it.

Lines carry no timestamps (the child writes them), so "lines since T" uses
size marks: every metrics tick notes each file's size with the time, and
``tail(since=T)`` starts at the size noted at the last mark before T. The
answer can include up to one tick's worth of older lines, never miss a newer
one (marks are dropped when the file is rotated, and then the whole file
counts as new).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from schemas.agent import LogSpec

__all__ = ["STREAMS", "LogFiles", "LogsDropped", "Stream"]

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")
_BLOCK = 64 * 1024
_MARKS = 2048  # per file: at a 5 s tick, about 3 hours of history


class LogsDropped(OSError):
    """A file past max_bytes was truncated but its backup could not be written."""


class LogFiles:
    """The log files of every agent under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = os.fspath(root)
        self._marks: dict[tuple[str, Stream], deque[tuple[float, int]]] = {}

    def mark(self, agent_id: str, stream: Stream, when: float, size: int) -> None:
        """Note that the file held ``size`` bytes at unix time ``when``."""
        marks = self._marks.get((agent_id, stream))
        if marks is None:
            marks = self._marks[(agent_id, stream)] = deque(maxlen=_MARKS)
        if marks and size < marks[-1][1]:
            marks.clear()  # truncated or replaced: older offsets mean nothing now
        marks.append((when, size))

    def _offset_since(self, agent_id: str, stream: Stream, since: float) -> int:
        marks = self._marks.get((agent_id, stream))
        if not marks:
            return 0
        index = bisect.bisect_right([t for t, _ in marks], since) - 1
        return marks[index][1] if index >= 0 else 0

    def path(self, agent_id: str, stream: Stream, backup: int = 0) -> Path:
        name = f"{stream}.log" if backup == 0 else f"{stream}.log.{backup}"
        return self.root / agent_id / name

    def open_for_spawn(self, agent_id: str, spec: LogSpec) -> tuple[int, int]:
        """fds (stdout, stderr) for a new process; the caller closes them after spawn."""
        (self.root / agent_id).mkdir(parents=True, exist_ok=True)
        fds: list[int] = []
        for stream in STREAMS:
            path = self.path(agent_id, stream)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > spec.max_bytes:
                    self._shift(agent_id, stream, spec.backups)
                    if spec.backups > 0:
                        path.rename(self.path(agent_id, stream, 1))
                    else:
                        path.unlink()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fds.append(os.open(path, flags, 0o640))
        return fds[0], fds[1]

    def rotate_if_needed(self, agent_id: str, spec: LogSpec) -> list[Stream]:
        """Copy-truncate the files of a running agent that grew past max_bytes.

        Raises :class:`LogsDropped` (after doing all it could) when a file had
        to be truncated without its backup, e.g. on a full disk.
        """
        rotated: list[Stream] = []
        dropped: list[str] = []
        for stream in STREAMS:
            # Runs for every agent on every tick: a plain string path is cheapest.
            try:
                size = os.stat(f"{self._root}/{agent_id}/{stream}.log").st_size
            except FileNotFoundError:
                continue
            self.mark(agent_id, stream, time.time(), size)
            if size <= spec.max_bytes:
                continue
            path = self.path(agent_id, stream)
            lost: OSError | None = None
            if spec.backups > 0:
                # Copy first, shift after: a copy that fails (disk full) must
                # not have pushed the good backups out for a partial one.
                fresh = self.root / agent_id / f"{stream}.log.1.tmp"
                try:
                    _copy_live(path, fresh)
                except OSError as exc:
                    lost = exc
                    with contextlib.suppress(OSError):
                        fresh.unlink()
                else:
                    self._shift(agent_id, stream, spec.backups)
                    fresh.rename(self.path(agent_id, stream, 1))
            # Truncated even when no backup could be made: a file past its
            # max_bytes must not keep a full disk full (what it held is lost).
            os.truncate(path, 0)
            self._marks.pop((agent_id, stream), None)
            rotated.append(stream)
            if lost is not None:
                dropped.append(
                    f"{stream}.log of {agent_id} truncated without a backup "
                    f"({size} bytes lost): {lost.strerror or lost}"
                )
        if dropped:
            raise LogsDropped("; ".join(dropped))
        return rotated

    def _shift(self, agent_id: str, stream: Stream, backups: int) -> None:
        """.N-1 -> .N, ..., .1 -> .2, dropping what falls past ``backups``."""
        if backups <= 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path(agent_id, stream, backups).unlink()
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                self.path(agent_id, stream, n).rename(self.path(agent_id, stream, n + 1))

    def tail(self, agent_id: str, stream: Stream, n: int, since: float | None = None) -> list[str]:
        """The last ``n`` lines of the current file (not the backups); with
        ``since`` (unix time), only lines written after about then."""
        if n <= 0:
            return []
        start = 0 if since is None else self._offset_since(agent_id, stream, since)
        try:
            with open(self.path(agent_id, stream), "rb") as f:
                end = f.seek(0, os.SEEK_END)
                if start > end:
                    start = 0  # rotated since the mark
                pos = end
                data = b""
                # One more newline than lines wanted: the first line read may be partial.
                while pos > start and data.count(b"\n") <= n:
                    step = min(_BLOCK, pos - start)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except FileNotFoundError:
            return []
        return data.decode("utf-8", "replace").splitlines()[-n:]

    async def follow(
        self, agent_id: str, stream: Stream, *, interval: float = 0.5, from_start: bool = False
    ) -> AsyncIterator[str]:
        """Yield complete lines as they are appended; carries on across rotation."""
        path = self.path(agent_id, stream)
        offset = 0
        if not from_start:
            with contextlib.suppress(FileNotFoundError):
                offset = path.stat().st_size
        partial = b""
        while True:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < offset:  # truncated by a rotation: the new data starts at 0
                offset, partial = 0, b""
            if size > offset:
                chunk = _read_range(path, offset, size)
                offset += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            await asyncio.sleep(interval)

    def remove(self, agent_id: str) -> None:
        for stream in STREAMS:
            self._marks.pop((agent_id, stream), None)
        shutil.rmtree(self.root / agent_id, ignore_errors=True)


def _read_range(path: Path, start: int, end: int) -> bytes:
    # A local file read of what was appended since the last poll: short, done inline.
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _copy_live(src: Path, dst: Path) -> None:
    """Copy a file that is still being appended to, up to its size at the last look."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while True:
            size = os.fstat(fin.fileno()).st_size
            if done >= size:
                return
            sent = os.sendfile(fout.fileno(), fin.fileno(), done, size - done)
            if sent == 0:
                return
            done += sent
