"""Helpers shared by the benchmarks in ``bench/`` (not a benchmark itself).

* :func:`pct` - nearest-rank percentile; :func:`render_table` - a Markdown table.
* :func:`machine` - what the figures were measured on.
* :func:`fabric_stack` - a throwaway PKI (CA, signing key, the identities
  asked for) and a real TLS nats-server in a temporary directory, all removed
  on exit.
* :class:`Marker` - tags every process a benchmark starts (through an
  environment variable its children inherit) so that :meth:`Marker.sweep`
  can find and kill, by pid, whatever is left at the end, even after a crash
  of the benchmark's own cleanup. Processes of anyone else never carry it.
* :func:`stop_process` - SIGTERM, grace, SIGKILL, reap.

Run benchmarks from the repository root; each inserts the root first on
``sys.path`` (``bench/node_agent.py`` would otherwise shadow the package).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fabric.nats_server import NatsServer  # noqa: E402
from fabric.pki import Identity, init_pki, issue_identity  # noqa: E402
from schemas.agent import Backoff, RestartPolicy, RestartPolicyKind  # noqa: E402

__all__ = [
    "ROOT",
    "ZERO_BACKOFF",
    "FabricStack",
    "Marker",
    "fabric_stack",
    "machine",
    "pct",
    "render_table",
    "stop_process",
]


# Restart at once, forever: what supervisord's autorestart=true does.
ZERO_BACKOFF = RestartPolicy(
    policy=RestartPolicyKind.ALWAYS, backoff=Backoff(initial=0, max=0, jitter=0), max_restarts=-1
)


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0-100) of ``xs``."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table, columns padded so it also reads well in a terminal."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine() -> dict[str, object]:
    """Date, CPU count, Python, kernel and load: the context of a set of figures."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


class Marker:
    """An environment variable that every process started by one benchmark run carries.

    :meth:`install` puts it in this process's environment, so each child and
    each child's children inherit it (nats-server, fabric-node, supervisord
    and their agents). :meth:`sweep` SIGKILLs, by pid, every process still
    carrying this run's value, except the benchmark itself.
    """

    def __init__(self, name: str = "AF_BENCH_RUN") -> None:
        self.name = name
        self.value = secrets.token_hex(8)

    def install(self) -> None:
        os.environ[self.name] = self.value

    def env(self) -> dict[str, str]:
        return {self.name: self.value}

    def survivors(self) -> list[psutil.Process]:
        me = os.getpid()
        found = []
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(self.name) == self.value:
                    found.append(proc)
        return found

    def sweep(self) -> list[str]:
        """Kill what is left; returns ``"pid cmdline"`` for each process it had to kill."""
        killed = []
        for proc in self.survivors():
            with contextlib.suppress(psutil.Error):
                killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
                proc.kill()
        if killed:
            psutil.wait_procs([p for p in self.survivors()], timeout=5)
        return killed


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """SIGTERM ``proc``, wait ``grace`` seconds, then SIGKILL; returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return proc.wait()


@dataclass(frozen=True)
class FabricStack:
    """A temporary directory holding a PKI and a running nats-server."""

    dir: Path
    pki_dir: Path
    server: NatsServer
    identities: dict[str, Identity]

    @property
    def ca(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def signing_key(self) -> Path:
        return self.pki_dir / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.pki_dir / "signing.pub"


@asynccontextmanager
async def fabric_stack(identities: dict[str, str]) -> AsyncIterator[FabricStack]:
    """A fresh PKI with ``identities`` (name -> role) and a TLS nats-server on a free port.

    The server is stopped and the directory removed on exit, error or cancel.
    """
    tmp = Path(tempfile.mkdtemp(prefix="fabric-bench-"))
    server: NatsServer | None = None
    try:
        pki_dir = tmp / "pki"
        init_pki(pki_dir)
        issued = {name: issue_identity(pki_dir, role, name) for name, role in identities.items()}
        server = NatsServer.local(pki_dir, tmp / "state")
        await server.start()
        yield FabricStack(dir=tmp, pki_dir=pki_dir, server=server, identities=issued)
    finally:
        try:
            if server is not None:
                await server.stop(grace=5)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
