"""Durable local state: what this node runs, so a restarted node agent re-adopts it.

One small JSON file per agent, ``<state_dir>/agents/<agent_id>.json``,
replaced atomically (temp file, ``os.replace``) on every change that
matters: spawn, exit, stop, place, remove. Per-agent files keep each write
small and independent of how many agents the node runs.

Two strengths of write, because the two ways of losing the node agent differ:

- a crash or kill -9 of the node agent loses nothing that was written: the
  page cache outlives the process. Spawn and exit records (pid, create time)
  only matter in this case (after a host crash every agent is dead anyway),
  so they are written without fsync, right after ``Popen`` returns and
  before the supervisor awaits anything: a node agent killed at any later
  point finds the pid and re-adopts the process instead of starting a
  duplicate.
- a host crash loses what is not fsynced. What must survive it is the
  operator's intent: placements (spec, epoch) and manual stops. Those writes
  are ``durable``, by group commit: :meth:`StateStore.write` replaces the
  file at once, like any other write, and queues it; :meth:`StateStore.sync`
  commits (in a worker thread, off the event loop: fsync every file queued
  since the previous commit, then the directory once) until every durable
  write made before the call is on disk; a commit under way is joined. The
  supervisor replies to a command only after that, so an acknowledged
  placement or stop is on disk, while the statuses it causes go out at
  once. Many placements or stops that arrive together share one commit:
  fsyncing 100 files and the directory once cost 0.11 ms a file here,
  against 0.7-0.9 ms for a file-and-directory fsync pair each. Until its
  commit, a host crash can lose a durable change like any other write (and
  the reply was never sent). :meth:`StateStore.save` and
  :meth:`StateStore.delete` still do it all inline (tools, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from pathlib import Path

import msgspec

from schemas.agent import AgentSpec, Transition
from schemas.ids import is_valid_id

__all__ = ["AgentRecord", "StateStore"]


class AgentRecord(msgspec.Struct, kw_only=True):
    """What must survive a node agent restart for one agent (local file, not wire)."""

    spec: AgentSpec
    epoch: int = 0
    pid: int | None = None
    create_time: float | None = None  # psutil create time: tells a reused pid apart
    restarts: int = 0
    manual_stop: bool = False  # never undone by the restart policy, even across restarts
    desired_running: bool = True
    cgroup: str | None = None
    last_state: str = "pending"
    history: list[Transition] = []
    """The lifecycle's bounded history, so a restarted node agent reports it on."""


log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AgentRecord)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "agents"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.skipped: list[str] = []  # unreadable files found by load_all
        # Group commit: durable writes queued (agent ids; None: a removal), how many
        # were made and how many of those are on disk, and the commit under way.
        self._queued: set[str | None] = set()
        self._written = 0
        self._committed = 0
        self._commit: asyncio.Task[None] | None = None

    def _path(self, agent_id: str) -> Path:
        return self.dir / f"{agent_id}.json"

    def save(self, record: AgentRecord, *, durable: bool = True) -> None:
        """Atomic replace; ``durable`` also survives a host crash (fsync, inline)."""
        self._replace(record, fsync=durable)
        if durable:
            self._sync_dir()

    def write(self, record: AgentRecord, *, durable: bool) -> None:
        """Atomic replace now; ``durable`` queues it for the next group commit."""
        self._replace(record, fsync=False)
        if durable:
            self._queue(record.spec.name)

    def _replace(self, record: AgentRecord, *, fsync: bool) -> None:
        path = self._path(record.spec.name)
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                data = _encoder.encode(record)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            # Disk full (or worse): the old record stays as it was, and no
            # half-written temp file is left to hold space.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def discard(self, agent_id: str) -> None:
        """Delete the agent's file now; the next group commit makes that durable."""
        with contextlib.suppress(FileNotFoundError):
            self._path(agent_id).unlink()
            self._queue(None)

    async def sync(self) -> None:
        """Wait until every durable write and discard made so far is on disk.

        Raises OSError when a commit fails (the writes stay queued for the next).
        """
        target = self._written
        while self._committed < target:
            task = self._commit
            if task is None:
                task = self._start_commit()
            await asyncio.shield(task)

    def _queue(self, agent_id: str | None) -> None:
        self._queued.add(agent_id)
        self._written += 1

    def _start_commit(self) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._commit_queued())
        self._commit = task
        task.add_done_callback(_log_failure)
        return task

    async def _commit_queued(self) -> None:
        ids, self._queued = self._queued, set()
        upto = self._written
        try:
            await asyncio.to_thread(self._fsync_all, ids)
        except BaseException:
            self._queued |= ids
            self._commit = None
            raise
        self._committed = max(self._committed, upto)
        self._commit = None

    def _fsync_all(self, ids: set[str | None]) -> None:
        for agent_id in ids:
            if agent_id is None:
                continue
            try:
                fd = os.open(self._path(agent_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed since: the directory sync covers it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._sync_dir()

    def delete(self, agent_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(agent_id).unlink()
            self._sync_dir()

    def load_all(self) -> dict[str, AgentRecord]:
        out: dict[str, AgentRecord] = {}
        self.skipped = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = _decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                self.skipped.append(path.name)
                continue
            if record.spec.name != path.stem or not is_valid_id(path.stem):
                self.skipped.append(path.name)
                continue
            out[record.spec.name] = record
        return out

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cannot commit the node's state to disk: %s", task.exception())
