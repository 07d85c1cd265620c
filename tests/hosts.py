"""A test bed of several real hosts on one machine: network namespaces on a bridge.

Each host is a network namespace with its own address on a private subnet
(10.<a>.<b>.0/24, chosen per bed), joined to the others by a bridge that
lives in a namespace of its own, so nothing here ever touches the machine's
own interfaces: no route, NAT or bridge leads outside, and only these test
hosts (and each one's loopback) receive traffic.

    with HostBed(3) as bed:
        bed.hosts[0].popen(["fabric", "nodes"])   # runs inside host 0
        bed.cut(1); bed.heal(1)                   # silent link loss and back
        bed.kill(2)                               # every process of host 2

Everything is torn down on exit, even when a test fails, and
:func:`leftovers` lets a test prove it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Host", "HostBed", "leftovers", "netns_unavailable"]

_PREFIX = "fabtest"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """Why this machine cannot host a bed, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{_PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def leftovers() -> list[str]:
    """Namespaces of any bed still present (a test asserts this is empty)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(_PREFIX)]


@dataclass
class Host:
    index: int
    name: str
    netns: str
    address: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host; ``ip netns exec`` execs it, so the pid is its own."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]


class HostBed:
    """``count`` hosts on one bridge; a context manager that always cleans up."""

    def __init__(self, count: int, workdir: Path | None = None) -> None:
        # Random, so beds of one run or of two runs at once never collide.
        tag = secrets.token_hex(3)
        self.prefix = f"{_PREFIX}-{tag}"
        self._if = f"fb{tag}"  # interface names are at most 15 characters
        self.subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
        self.switch = f"{self.prefix}-sw"
        self.workdir = workdir
        self.hosts = [
            Host(i, f"host-{i + 1}", f"{self.prefix}-h{i + 1}", f"{self.subnet}.{i + 1}")
            for i in range(count)
        ]

    def __enter__(self) -> HostBed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            inside, outside = f"{self._if}h{host.index}a", f"{self._if}h{host.index}b"
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", host.netns)
            _ip("link", "set", outside, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", outside, "master", "br0")
            _ip("-n", self.switch, "link", "set", outside, "up")
            _ip("-n", host.netns, "link", "set", inside, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def _port(self, host: Host) -> str:
        return f"{self._if}h{host.index}b"

    def cut(self, index: int) -> None:
        """Take the host's link down at the switch: silence, no reset, no FIN."""
        _ip("-n", self.switch, "link", "set", self._port(self.hosts[index]), "down")

    def heal(self, index: int) -> None:
        _ip("-n", self.switch, "link", "set", self._port(self.hosts[index]), "up")

    def kill(self, index: int) -> None:
        """SIGKILL every process in the host, as if it lost power."""
        for pid in self.hosts[index].pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in host.procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Anything the processes left behind in the namespace goes too.
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in [h.netns for h in self.hosts] + [self.switch]:
            _ip("netns", "del", ns, check=False)
