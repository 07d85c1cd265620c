"""cgroup v2: find a writable subtree, give each agent its own child cgroup.

Detection reads ``/proc/self/mountinfo`` for the ``cgroup2`` mount (on a
hybrid host it is ``/sys/fs/cgroup/unified``, on a unified one
``/sys/fs/cgroup``) and ``/proc/self/cgroup`` for the node agent's own
cgroup. Agents live under ``<mount><own cgroup>/<name>/<agent_id>``. A
cgroup there gives tracking of the whole tree (``cgroup.procs``), a kill of
every member at once (``cgroup.kill``) and pause (``cgroup.freeze``) even
with no resource controller; ``memory.max``, ``cpu.max`` and ``pids.max``
only where those controllers are enabled for the subtree.

How a host gives us controllers: run ``fabric-node`` as a systemd service
with ``Delegate=yes`` (``Delegate=memory cpu pids`` to be precise). systemd
then hands the service's cgroup (e.g.
``/sys/fs/cgroup/system.slice/fabric-node.service``) to the service: it may
create children and write their ``cgroup.subtree_control``. cgroup v2's
"no internal processes" rule forbids enabling controllers for children of a
cgroup that holds processes itself, so the node agent first moves itself
into a leaf (``<own>/node-agent``) and then enables ``+memory +cpu +pids``
in its own cgroup and in the agents' parent. This module does exactly that
when the first enabling attempt fails with EBUSY.

Every write here is a small sysfs write done inline: they take microseconds
and cannot block on disk, with one exception a host should fix: moving a
process into a cgroup (a write to ``cgroup.procs``, done for every spawn by
node_agent.spawn) takes ``cgroup_threadgroup_rwsem`` for writing, and on a
cgroup2 mount without ``favordynmods`` that waits for an RCU grace period
whenever no other migration happened within the last one: 12-15 ms on this
kind of VM (HZ=250, lazy RCU), against ~0.05 ms with it. That write is on
the path of every spawn and restart (kill -9 -> new pid RUNNING: ~22 ms
instead of 5-8). Where the node agent's host owns the hierarchy, mount it
with the option (Linux 6.0+): ``mount -o remount,favordynmods
/sys/fs/cgroup`` (``/sys/fs/cgroup/unified`` on a hybrid host), or build the
kernel with ``CONFIG_CGROUP_FAVOR_DYNMODS=y``. The cost of the option is
slower fork/exit paths in exchange for cheap migrations, which is the trade
a process supervisor wants; on kernel 6.18 it cannot be turned off again
until reboot ("per threadgroup rwsem mechanism can't be disabled").
``bench/node_agent.py`` prints what a join adds to a spawn on its machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from pathlib import Path

__all__ = ["AgentCgroup", "CgroupTree", "find_cgroup2_mount", "own_cgroup_path"]

WANTED_CONTROLLERS = ("memory", "cpu", "pids")


def _cgroup2_line(mountinfo: str) -> tuple[list[str], list[str]] | None:
    """The cgroup2 line of a ``/proc/self/mountinfo`` text, split at its `` - ``
    separator: (mount fields, [fstype, source, super options])."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = right.split()
        if sep and fields and fields[0] == "cgroup2":
            return left.split(), fields
    return None


def find_cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup2 hierarchy in a ``/proc/self/mountinfo`` text."""
    found = _cgroup2_line(mountinfo)
    if found is None or len(found[0]) < 5:
        return None
    # Mount points escape spaces and the like as octal (\040).
    return Path(found[0][4].encode().decode("unicode_escape"))


def favors_dynmods(mountinfo: str) -> bool:
    """True when the cgroup2 mount in a ``/proc/self/mountinfo`` text has the
    ``favordynmods`` super option (cheap migrations; see the module doc)."""
    found = _cgroup2_line(mountinfo)
    return found is not None and len(found[1]) >= 3 and ("favordynmods" in found[1][2].split(","))


def host_favors_dynmods() -> bool:
    """:func:`favors_dynmods` of this process's own mount table (False if unreadable)."""
    try:
        return favors_dynmods(_read(Path("/proc/self/mountinfo")))
    except OSError:
        return False


def own_cgroup_path(proc_cgroup: str) -> str | None:
    """The v2 cgroup path (``0::/...`` line) in a ``/proc/<pid>/cgroup`` text."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


class AgentCgroup:
    """One agent's cgroup directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._procs = os.fsencode(path / "cgroup.procs")  # read on every metrics tick

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            fd = os.open(self._procs, os.O_RDONLY)
        except OSError:
            return []
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError:
            return []
        finally:
            os.close(fd)
        return [int(x) for x in b"".join(chunks).split()]

    def controllers(self) -> frozenset[str]:
        try:
            return frozenset(_read(self.path / "cgroup.controllers").split())
        except OSError:
            return frozenset()

    def kill(self) -> bool:
        """SIGKILL every member (kernel 5.14+); False where ``cgroup.kill`` is missing."""
        try:
            _write(self.path / "cgroup.kill", "1")
            return True
        except OSError:
            return False

    def freeze(self, frozen: bool) -> None:
        _write(self.path / "cgroup.freeze", "1" if frozen else "0")

    def events(self) -> dict[str, str]:
        try:
            pairs = (line.split() for line in _read(self.path / "cgroup.events").splitlines())
            return {p[0]: p[1] for p in pairs if len(p) == 2}
        except OSError:
            return {}

    def set(self, name: str, value: str) -> None:
        _write(self.path / name, value)

    def exists(self) -> bool:
        return self.path.is_dir()

    async def remove(self) -> bool:
        """rmdir once the members are gone; the kernel needs a moment after a kill.

        Tries for about a second (100 x 10 ms) before giving up.
        """
        for _ in range(100):
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return False
            self.kill()
            await asyncio.sleep(0.01)
        return False


class CgroupTree:
    """The writable v2 subtree the node agent puts its agents in."""

    def __init__(self, base: Path, controllers: frozenset[str]) -> None:
        self.base = base
        self.controllers = controllers  # enabled for agent cgroups

    @classmethod
    def detect(cls, base: Path | None = None, name: str = "fabric-agents") -> CgroupTree | None:
        """The agents' parent cgroup, created if needed; None when none is writable.

        ``base`` overrides the location; otherwise ``<mount><own cgroup>/<name>``.
        """
        try:
            if base is None:
                mount = find_cgroup2_mount(_read(Path("/proc/self/mountinfo")))
                own = own_cgroup_path(_read(Path("/proc/self/cgroup")))
                if mount is None or own is None:
                    return None
                base = mount / own.lstrip("/") / name
            base.mkdir(parents=True, exist_ok=True)
            if not (base / "cgroup.procs").exists():
                return None  # not a cgroup filesystem
        except OSError:
            return None
        _enable_controllers(base)
        try:
            enabled = frozenset(_read(base / "cgroup.subtree_control").split())
        except OSError:
            enabled = frozenset()
        return cls(base, enabled)

    def agent(self, agent_id: str) -> AgentCgroup:
        path = self.base / agent_id
        path.mkdir(exist_ok=True)
        return AgentCgroup(path)

    def prune(self, keep: set[str]) -> None:
        """rmdir the empty agent cgroups not in ``keep`` (left by removed agents)."""
        with contextlib.suppress(OSError):
            for child in self.base.iterdir():
                if child.is_dir() and child.name not in keep:
                    with contextlib.suppress(OSError):
                        child.rmdir()  # fails, as it should, while processes remain

    def remove_base(self) -> None:
        """Drop the agents' parent when it is empty (drain shutdown)."""
        with contextlib.suppress(OSError):
            self.base.rmdir()


def _enable_controllers(base: Path) -> None:
    """Best effort: enable memory/cpu/pids down to ``base``'s children."""
    parent = base.parent
    try:
        offered = set(_read(parent / "cgroup.controllers").split())
    except OSError:
        return
    wanted = [c for c in WANTED_CONTROLLERS if c in offered]
    if not wanted:
        return
    line = " ".join(f"+{c}" for c in wanted)
    try:
        _write(parent / "cgroup.subtree_control", line)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return
        # Our own cgroup holds processes (us): move into a leaf, then retry.
        leaf = parent / "node-agent"
        try:
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(parent / "cgroup.subtree_control", line)
        except OSError:
            return
    with contextlib.suppress(OSError):
        _write(base / "cgroup.subtree_control", line)
