"""Health checks (process, TCP, HTTP, exec) and the verdict they add up to.

:class:`HealthJudge` is the pure verdict logic; :class:`HealthMonitor` runs
one check on its interval as an asyncio task and reports verdict changes.
Every probe is non-blocking: TCP and HTTP use ``asyncio.open_connection``,
exec spawns through ``spawn.Popen`` + the reaper (never asyncio's
subprocess API, whose child watcher would race the reaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from node_agent.reaper import ChildReaper
from node_agent.spawn import _identity as spawn_identity  # the agent's own uid/gid/groups
from schemas.agent import (
    ExecCheck,
    HealthCheck,
    HealthSpec,
    HealthVerdict,
    HttpCheck,
    ProcessCheck,
    TcpCheck,
)

__all__ = [
    "CheckFailed",
    "HealthJudge",
    "HealthMonitor",
    "http_status",
    "make_probe",
    "run_exec",
    "tcp_connect",
]

V = HealthVerdict


class HealthJudge:
    """Consecutive results -> verdict.

    ``unknown`` until the first result; ``healthy`` after ``success``
    consecutive successes; ``degraded`` after 1..``failure``-1 consecutive
    failures; ``unhealthy`` at ``failure``. Short runs of successes leave
    the verdict where it was, so an unhealthy agent needs the full
    ``success`` count to be healthy again.
    """

    def __init__(self, failure_threshold: int, success_threshold: int) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.verdict = V.UNKNOWN
        self.failures = 0
        self.successes = 0

    def record(self, ok: bool) -> HealthVerdict:
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.success_threshold:
                self.verdict = V.HEALTHY
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.failure_threshold:
                self.verdict = V.UNHEALTHY
            elif self.verdict is not V.UNHEALTHY:
                self.verdict = V.DEGRADED
        return self.verdict


async def tcp_connect(host: str, port: int) -> None:
    """Raises OSError when nothing accepts on host:port."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def http_status(url: str, ssl_context: ssl.SSLContext | None = None) -> int:
    """Status code of ``GET url``: HTTP/1.1 over asyncio, reading only the status line."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if https else 80)
    ctx = (ssl_context or ssl.create_default_context()) if https else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=host if https else None
    )
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "User-Agent: fabric-node\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    fields = line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    return int(fields[1])


async def run_exec(
    reaper: ChildReaper,
    argv: list[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    group: str | None = None,
) -> int | None:
    """Run a check command to completion; its exit code (None when killed by a signal).

    ``user``/``group`` are the agent's (AgentSpec.user/group): the check runs
    with the agent's identity, never the node agent's, so a spec cannot gain
    the node's privileges (root, under systemd) through its health check.
    Cancelling (the caller's timeout) kills the command's whole group and
    waits for the reaper to collect it, so no check is ever left running.
    """
    identity = spawn_identity(user, group) if user is not None or group is not None else {}
    proc = _start(argv, cwd, env, identity)
    exited = reaper.watch(proc.pid)  # before any await: the reaper must know it
    try:
        info = await asyncio.shield(exited)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.CancelledError):
            await exited
        raise
    finally:
        proc.returncode = -1 if proc.returncode is None else proc.returncode
    return info.code


def _start(
    argv: list[str],
    cwd: str | None,
    env: Mapping[str, str] | None,
    identity: Mapping[str, object],
) -> subprocess.Popen[bytes]:
    # Popen blocks only until the child exec'd (well under a millisecond): fine on the loop.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        close_fds=True,
        start_new_session=True,
        **identity,  # type: ignore[arg-type]
    )


class CheckFailed(Exception):
    """A probe ran but its answer was wrong (bad status, nonzero exit, dead pid)."""


Probe = Callable[[], Awaitable[None]]
"""A check: returns when healthy, raises (anything) when not."""


class HealthMonitor:
    """Runs one probe on the spec's schedule and reports each verdict change."""

    def __init__(
        self,
        spec: HealthSpec,
        probe: Probe,
        on_change: Callable[[HealthVerdict, str], None],
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.spec = spec
        self.judge = HealthJudge(spec.failure_threshold, spec.success_threshold)
        self._probe = probe
        self._on_change = on_change
        self._active = active  # False while the agent is paused: a frozen process fails probes
        self.last_error = ""

    async def check_once(self) -> bool:
        try:
            async with asyncio.timeout(self.spec.timeout):
                await self._probe()
        except TimeoutError:
            self.last_error = f"timed out after {self.spec.timeout:g} s"
            return False
        except Exception as exc:  # any failure of a probe is an unhealthy answer, not a crash
            self.last_error = str(exc) or type(exc).__name__
            return False
        self.last_error = ""
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.spec.initial_delay)
        while True:
            started = loop.time()
            if self._active():
                before = self.judge.verdict
                after = self.judge.record(await self.check_once())
                if after is not before:
                    self._on_change(after, self.last_error)
            await asyncio.sleep(max(0.0, self.spec.interval - (loop.time() - started)))


def make_probe(
    check: HealthCheck,
    *,
    alive: Callable[[], bool],
    reaper: ChildReaper,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    group: str | None = None,
) -> Probe:
    """The probe for one check kind; ``alive`` answers the process check.

    An exec check runs as ``user``/``group`` (the agent's own), like the agent.
    """
    match check:
        case ProcessCheck():

            async def probe() -> None:
                if not alive():
                    raise CheckFailed("process is gone or a zombie")

        case TcpCheck(port=port, host=host):

            async def probe() -> None:
                await tcp_connect(host, port)

        case HttpCheck(url=url, expect_status_min=lo, expect_status_max=hi):
            ctx = ssl.create_default_context() if url.startswith("https") else None

            async def probe() -> None:
                status = await http_status(url, ctx)
                if not lo <= status <= hi:
                    raise CheckFailed(f"HTTP status {status}")

        case ExecCheck(argv=argv):

            async def probe() -> None:
                code = await run_exec(reaper, list(argv), cwd=cwd, env=env, user=user, group=group)
                if code != 0:
                    raise CheckFailed(f"check command exited with {code}")

    return probe
