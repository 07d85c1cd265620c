"""Samples of each agent's whole process tree, and of the node.

Cost is the point here (target: 1,000 idle agents every 5 s for under 2 %
of one core), hence:

- one pass over ``/proc/*/stat`` per tick builds the parent map for every
  agent not in a cgroup (``psutil.Process.children(recursive=True)`` rescans
  all of ``/proc`` for each call: ~8 ms each with 1,000 processes around);
  agents in a cgroup list their members from ``cgroup.procs`` instead;
- ``psutil.Process`` objects are cached between ticks and read under
  ``oneshot()``;
- CPU % comes from cpu-time deltas between ticks (a process seen for the
  first time is averaged over its lifetime), never ``cpu_percent(interval)``.

A tree's members are also what the stop path kills at the end ("every
descendant seen"); the supervisor keeps them from :class:`TreeSample`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from schemas.agent import AgentMetrics
from schemas.node import NodeMetrics

__all__ = ["ProcKey", "ProcTable", "TreeSample", "TreeSampler", "node_metrics"]

_MIN_SPAN = 0.25  # seconds
ProcKey = tuple[int, float]  # (pid, create_time): one process, even across pid reuse


@dataclass(slots=True)
class _Seen:
    proc: psutil.Process
    cpu: float  # user+system seconds at the last sample
    at: float  # wall clock of the last sample
    pct: float = 0.0  # the CPU % last computed
    fresh: bool = True  # not sampled yet: average over the lifetime, however short


@dataclass(slots=True)
class TreeSample:
    metrics: AgentMetrics
    members: list[ProcKey] = field(default_factory=list)


class ProcTable:
    """pid -> parent pid for every process, from one pass over /proc."""

    def __init__(self, parents: dict[int, int]) -> None:
        self.parents = parents
        self.children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            self.children.setdefault(ppid, []).append(pid)

    @classmethod
    def scan(cls) -> ProcTable:
        parents: dict[int, int] = {}
        with os.scandir("/proc") as it:
            for entry in it:
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as f:
                        data = f.read()
                except OSError:
                    continue  # exited during the scan
                # The command name may hold spaces and parens; fields resume after the last ')'.
                rest = data[data.rfind(b")") + 2 :].split(b" ", 2)
                parents[int(entry.name)] = int(rest[1])
        return cls(parents)

    def exists(self, pid: int) -> bool:
        return pid in self.parents

    def descendants(self, root: int) -> list[int]:
        out: list[int] = []
        stack = [root]
        while stack:
            for child in self.children.get(stack.pop(), ()):
                out.append(child)
                stack.append(child)
        return out


class TreeSampler:
    """Samples process trees; keeps psutil objects between ticks for CPU deltas."""

    def __init__(self) -> None:
        self._seen: dict[ProcKey, _Seen] = {}
        self._by_pid: dict[int, ProcKey] = {}
        self._touched: set[ProcKey] = set()

    def sample(self, pids: Iterable[int]) -> TreeSample:
        """Sum the metrics of ``pids`` (a whole tree: main pid first)."""
        now = time.time()
        cpu_pct = 0.0
        rss = threads = fds = rd = wr = zombies = 0
        members: list[ProcKey] = []
        for pid in pids:
            seen = self._lookup(pid)
            if seen is None:
                continue
            proc = seen.proc
            try:
                with proc.oneshot():
                    status = proc.status()
                    if status == psutil.STATUS_ZOMBIE:
                        zombies += 1
                        members.append((pid, proc.create_time()))
                        continue
                    cpu_pct += self._cpu_percent(seen, proc.cpu_times(), now)
                    rss += proc.memory_info().rss
                    threads += proc.num_threads()
                    fds += proc.num_fds()
                    io = proc.io_counters()
                    rd += io.read_bytes
                    wr += io.write_bytes
                    members.append((pid, proc.create_time()))
            except psutil.Error:
                continue  # exited while we looked
        metrics = AgentMetrics(
            cpu_percent=round(cpu_pct, 2),
            rss_bytes=rss,
            threads=threads,
            open_fds=fds,
            io_read_bytes=rd,
            io_write_bytes=wr,
            children=max(0, len(members) - 1),
            zombies=zombies,
        )
        return TreeSample(metrics, members)

    @staticmethod
    def _cpu_percent(seen: _Seen, times: Any, now: float) -> float:
        total = float(times.user + times.system)
        if total < seen.cpu:  # a new process under a reused pid
            seen.cpu, seen.at = 0.0, seen.proc.create_time()
        # CPU times tick in 10 ms steps: a rate over a shorter span than this is
        # noise, so samples taken close together repeat the last figure.
        if seen.fresh or now - seen.at >= _MIN_SPAN:
            seen.pct = 100.0 * max(0.0, total - seen.cpu) / max(1e-3, now - seen.at)
            seen.cpu, seen.at, seen.fresh = total, now, False
        return seen.pct

    def _lookup(self, pid: int) -> _Seen | None:
        # Looked up by pid alone: a pid listed in an agent's tree belongs to that
        # agent whichever process holds it, and checking the create time of every
        # member on every tick would add a /proc read each. A reused pid shows as
        # a CPU total going backwards, handled in sample().
        key = self._by_pid.get(pid)
        if key is not None:
            self._touched.add(key)
            return self._seen[key]
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
        except psutil.Error:
            return None
        # First sight: CPU is averaged over the process's lifetime so far.
        seen = _Seen(proc, 0.0, key[1])
        self._seen[key] = seen
        self._by_pid[pid] = key
        self._touched.add(key)
        return seen

    def end_tick(self) -> None:
        """Forget processes not sampled in this tick (exited or moved out)."""
        for key in set(self._seen) - self._touched:
            del self._seen[key]
            if self._by_pid.get(key[0]) == key:
                del self._by_pid[key[0]]
        self._touched.clear()


def node_metrics(state_dir: Path) -> NodeMetrics:
    """CPU (since the previous call), memory, load and the state dir's disk."""
    mem = psutil.virtual_memory()
    load1, load5, load15 = os.getloadavg()
    disk = shutil.disk_usage(state_dir)
    return NodeMetrics(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=mem.total - mem.available,
        memory_total_bytes=mem.total,
        load1=load1,
        load5=load5,
        load15=load15,
        disk_free_bytes=disk.free,
        disk_total_bytes=disk.total,
    )
