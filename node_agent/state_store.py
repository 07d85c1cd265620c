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
  are ``durable``: fsync the file, ``os.replace``, fsync the directory
  (~0.5 ms here).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import msgspec

from schemas.agent import AgentSpec
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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AgentRecord)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "agents"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.skipped: list[str] = []  # unreadable files found by load_all

    def _path(self, agent_id: str) -> Path:
        return self.dir / f"{agent_id}.json"

    def save(self, record: AgentRecord, *, durable: bool = True) -> None:
        """Atomic replace; ``durable`` also survives a host crash (fsync)."""
        path = self._path(record.spec.name)
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                data = _encoder.encode(record)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
                if durable:
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
        if durable:
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
