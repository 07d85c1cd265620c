"""``fabric up``: a whole fabric on one machine, in the foreground.

What runs, all children of this process, each in its own session (a Ctrl-C
at the terminal reaches only us, and we stop them in order) and each asked
by the kernel to exit if we die (``PR_SET_PDEATHSIG``)::

    nats-server   TLS only, JetStream in STATE/jetstream     (fabric.nats_server)
    controller    `fabric controller run`, a subprocess      log: STATE/logs/controller-1.log
    local-1..N    `fabric-node`, one subprocess per node     log: STATE/logs/local-<i>.log

The controller is a subprocess, not a task in this process: a crash in it
cannot take the orchestration (and thus the clean shutdown) down with it, and
it runs exactly the code production runs under systemd.

State directory layout (``--state-dir``, default ``./.fabric``)::

    pki/              CA, server cert, identities, token signing pair
    nats/ jetstream/  server config + log, JetStream store (reused: deployments persist)
    nodes/local-<i>/  each node agent's durable state and agent logs
    logs/             controller and node agent logs
    fabric.env        what the CLI reads (sourceable)
    up.lock           held while a `fabric up` runs here (a second one is refused)

Start order: PKI, server, controller (ready when it answers discovery),
nodes (ready when registered with their own pid), then ``fabric.env``.
Stop order: nodes get SIGTERM together and drain their agents; the
controller is stopped as soon as the first node has gone (else it could
re-place that node's agents on a node that is itself shutting down) or once
all have; then the server. Any failure while starting stops what was started,
by pid, and is reported as one line.

The process handling here needs no NATS; only the readiness probe talks to
the fabric, through :mod:`fabric.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fabric.cli import CommandFailed
from fabric.client import FabricClient, open_client
from fabric.connect import ENV_CA, ENV_CERT, ENV_KEY, ENV_URL
from fabric.env import ENV_FILE, ENV_STATE_DIR, ENV_TOKEN_KEY, FabricEnv, write_env_file
from fabric.nats_server import NatsServer, NatsServerError
from fabric.pki import PkiError, init_pki, issue_identity, load_inventory
from fabric.procwait import wait_for_exit
from fabric.tokens import SIGNING_KEY, SIGNING_PUB
from schemas.discovery import DiscoverRequest
from schemas.node import NodeState

__all__ = [
    "ADMIN",
    "CONTROLLER",
    "Child",
    "LocalFabric",
    "UpConfig",
    "UpError",
    "identities_for",
    "node_ids",
    "prepare_pki",
]

ADMIN = "admin"
VIEWER = "viewer"
WORKER = "worker"
CONTROLLER = "controller-1"
_PR_SET_PDEATHSIG = 1
_POLL = 0.1
_LOCK_FILE = "up.lock"


class UpError(Exception):
    """Start-up or supervision failed: the message is one line for a person."""


@dataclass(frozen=True, slots=True)
class UpConfig:
    state_dir: Path
    nodes: int = 1
    host: str = "127.0.0.1"
    port: int = 4222
    """0: any free port."""
    ready_timeout: float = 30.0
    node_stop_grace: float = 60.0
    """How long a node agent may take to drain its agents before SIGKILL."""
    heartbeat_interval: float = 1.0
    node_timeout: float = 5.0
    metrics_interval: float = 2.0
    metrics_port: int | None = None
    """Where the controller serves Prometheus metrics on loopback (None: not at all)."""

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def node_ids(count: int) -> list[str]:
    return [f"local-{i}" for i in range(1, count + 1)]


def identities_for(nodes: int) -> dict[str, str]:
    """name -> role of every identity a local fabric with ``nodes`` nodes needs."""
    wanted = {CONTROLLER: "controller", ADMIN: "operator", VIEWER: "viewer", WORKER: "worker"}
    wanted.update({node: "node" for node in node_ids(nodes)})
    return wanted


def prepare_pki(pki_dir: Path, nodes: int) -> tuple[bool, list[str]]:
    """Make the PKI on first use and issue what is missing; (created, names issued).

    A revoked identity is not re-issued behind the operator's back: that is
    an error to resolve by hand.
    """
    try:
        created = not (pki_dir / "ca.crt").exists()
        if created:
            init_pki(pki_dir)
        have = {e.name: e for e in load_inventory(pki_dir)}
        issued = []
        for name, role in identities_for(nodes).items():
            entry = have.get(name)
            if entry is None:
                issue_identity(pki_dir, role, name)
                issued.append(name)
            elif entry.revoked:
                raise UpError(
                    f"identity {name!r} is revoked in {pki_dir}; re-issue it with --force"
                )
            elif entry.role != role:
                raise UpError(f"identity {name!r} in {pki_dir} has role {entry.role}, not {role}")
        return created, issued
    except PkiError as exc:
        raise UpError(str(exc)) from None


def _parent_death_signal() -> Callable[[], None] | None:
    """Pre-exec hook: the kernel sends SIGTERM to the child if we die first.

    That is what keeps a SIGKILLed ``fabric up`` from leaving node agents and
    their agents running: each node agent then drains as on a normal stop.
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
        if os.getppid() != parent:  # we died between fork and prctl
            os._exit(1)

    return hook


def _child_env() -> dict[str, str]:
    # Children get their settings as flags; a FABRIC_* left in our environment
    # (a sourced fabric.env of another fabric) must not override them.
    return {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}


class Child:
    """One subprocess with its output in a log file; stopped and reaped by pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Popen (one fork/exec) rather than asyncio's subprocess: waiting is
            # done with a pidfd (fabric.procwait), no child watcher thread involved.
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )

    def last_line(self) -> str:
        """The last line of its log worth quoting in an error."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines):
            if line.strip() and not line.startswith("Traceback"):
                return line.strip()[:300]
        return "nothing in its log"

    async def wait(self, limit: float | None = None) -> int | None:
        """Exit code once it has exited, None on timeout (or if never started)."""
        if self._proc is None:
            return None
        return await wait_for_exit(self._proc, limit)

    def signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM; after ``grace`` s SIGKILL to its whole process group; reaped."""
        if self._proc is None:
            return None
        self.signal(signal.SIGTERM)
        code = await self.wait(grace)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            code = await self.wait(None)
        return code


class _StateLock:
    """An flock on STATE/up.lock for as long as this `fabric up` lives."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / _LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UpError(
                f"a fabric is already up in {self.path.parent} (pid {holder}):"
                " stop it first, or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def check_port(host: str, port: int) -> None:
    """Refuse a busy port up front, in one line, before anything is started."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # nats-server sets SO_REUSEADDR too: a port in TIME_WAIT is not busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpError(
                    f"port {port} on {host} is in use: pass --port P, or --port 0 for any free port"
                ) from None
            raise UpError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _fmt_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class LocalFabric:
    """Starts, watches and stops the parts of a local fabric."""

    def __init__(self, config: UpConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.server: NatsServer | None = None
        self.controller: Child | None = None
        self.nodes: list[Child] = []
        self._lock = _StateLock(config.state_dir)
        self.env: FabricEnv | None = None

    @property
    def env_path(self) -> Path:
        return self.config.state_dir / ENV_FILE

    # --- start ----------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        check_port(cfg.host, cfg.port)
        created, issued = prepare_pki(cfg.pki_dir, cfg.nodes)
        if created:
            self.say(f"made a new PKI in {cfg.pki_dir}")
        elif issued:
            self.say(f"issued {', '.join(issued)} in {cfg.pki_dir}")
        self.server = NatsServer.local(cfg.pki_dir, cfg.state_dir, host=cfg.host, port=cfg.port)
        try:
            await self.server.start()
        except NatsServerError as exc:
            raise UpError(str(exc).splitlines()[0]) from None
        self.say(f"nats-server  {self.server.url}  pid {self.server.pid}")
        self.env = self._env()
        async with open_client(env=self.env, request_timeout=2.0, name="fabric-up") as client:
            self.controller = self._controller_child()
            self.controller.start()
            await self._until(client, "controller", self._controller_ready, [self.controller])
            self.say(f"controller   {CONTROLLER}  pid {self.controller.pid}")
            self.nodes = [self._node_child(node) for node in node_ids(cfg.nodes)]
            for child in self.nodes:
                child.start()
            await self._until(client, "node agents", self._nodes_ready, self.nodes)
            for child in self.nodes:
                self.say(f"node         {child.name}  pid {child.pid}")
        self._write_env()

    def _env(self) -> FabricEnv:
        assert self.server is not None
        pki = self.config.pki_dir
        return FabricEnv(
            url=self.server.url,
            ca=pki / "ca.crt",
            cert=pki / f"{ADMIN}.crt",
            key=pki / f"{ADMIN}.key",
            token_key=pki / SIGNING_KEY,
            state_dir=self.config.state_dir,
            source="fabric up",
        )

    def _controller_child(self) -> Child:
        cfg, pki = self.config, self.config.pki_dir
        assert self.server is not None
        argv = [
            sys.executable,
            "-m",
            "fabric",
            "controller",
            "run",
            "--name",
            CONTROLLER,
            "--url",
            self.server.url,
            "--ca",
            str(pki / "ca.crt"),
            "--cert",
            str(pki / f"{CONTROLLER}.crt"),
            "--key",
            str(pki / f"{CONTROLLER}.key"),
            "--pki",
            str(pki),
            "--heartbeat-interval",
            str(cfg.heartbeat_interval),
            "--node-timeout",
            str(cfg.node_timeout),
        ]
        if cfg.metrics_port is not None:
            argv += ["--metrics-port", str(cfg.metrics_port), "--metrics-host", "127.0.0.1"]
        return Child(CONTROLLER, argv, cfg.log_dir / f"{CONTROLLER}.log")

    def _node_child(self, node_id: str) -> Child:
        cfg, pki = self.config, self.config.pki_dir
        assert self.server is not None
        # `python -m node_agent.main` is the `fabric-node` entry point without
        # a launcher in between: the pid we hold is the node agent's own, which
        # is how readiness (the pid it registers with) is matched.
        argv = [
            sys.executable,
            "-m",
            "node_agent.main",
            "--node-id",
            node_id,
            "--state-dir",
            str(cfg.state_dir / "nodes" / node_id),
            "--nats-url",
            self.server.url,
            "--ca",
            str(pki / "ca.crt"),
            "--cert",
            str(pki / f"{node_id}.crt"),
            "--key",
            str(pki / f"{node_id}.key"),
            "--token-key",
            str(pki / SIGNING_PUB),
            "--worker-cert",
            str(pki / f"{WORKER}.crt"),
            "--worker-key",
            str(pki / f"{WORKER}.key"),
            "--heartbeat-interval",
            str(cfg.heartbeat_interval),
            "--metrics-interval",
            str(cfg.metrics_interval),
        ]
        return Child(node_id, argv, cfg.log_dir / f"{node_id}.log")

    async def _controller_ready(self, client: FabricClient) -> str | None:
        """None when ready, else what is still missing."""
        try:
            await client.discover(DiscoverRequest(what="nodes"), within=1.0)
        except CommandFailed as exc:
            return str(exc)
        return None

    async def _nodes_ready(self, client: FabricClient) -> str | None:
        try:
            reply = await client.discover(DiscoverRequest(what="nodes"), within=1.0)
        except CommandFailed as exc:
            return str(exc)
        # Matched by pid: a record left in KV by the previous run is not us.
        ready = {
            r.info.node_id
            for r in reply.nodes
            if r.state is NodeState.READY
            and any(c.name == r.info.node_id and c.pid == r.info.pid for c in self.nodes)
        }
        waiting = [c.name for c in self.nodes if c.name not in ready]
        return f"not registered yet: {', '.join(waiting)}" if waiting else None

    async def _until(
        self,
        client: FabricClient,
        what: str,
        check: Callable[[FabricClient], object],
        children: list[Child],
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout
        while True:
            for child in children:
                if not child.running:
                    raise UpError(
                        f"{child.name} {_fmt_exit(child.returncode)} while starting:"
                        f" {child.last_line()} (log: {child.log_path})"
                    )
            missing = await check(client)  # type: ignore[misc]
            if missing is None:
                return
            if loop.time() >= deadline:
                logs = ", ".join(str(c.log_path) for c in children)
                raise UpError(
                    f"{what} not ready after {self.config.ready_timeout:g}s ({missing}); see {logs}"
                )
            await asyncio.sleep(_POLL)

    def _write_env(self) -> None:
        env = self.env
        assert env is not None and env.token_key is not None
        values = {
            ENV_URL: env.url,
            ENV_CA: str(env.ca),
            ENV_CERT: str(env.cert),
            ENV_KEY: str(env.key),
            ENV_TOKEN_KEY: str(env.token_key),
            ENV_STATE_DIR: str(self.config.state_dir),
        }
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        header = (
            f"Written by `fabric up` (pid {os.getpid()}) at {stamp}.\n"
            f"The CLI finds it by itself; other tools: `. {self.env_path}`"
        )
        write_env_file(self.env_path, values, header)

    # --- run ------------------------------------------------------------------

    async def watch(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise UpError if a part dies on its own."""
        assert self.server is not None
        parts: dict[asyncio.Task[int | None], str] = {
            asyncio.create_task(self.server.wait()): "nats-server"
        }
        for child in [c for c in (self.controller, *self.nodes) if c is not None]:
            parts[asyncio.create_task(child.wait())] = child.name
        stopped = asyncio.create_task(stop.wait())
        stamp = _inventory_stamp(self.config.pki_dir)
        try:
            while True:
                done, _ = await asyncio.wait({stopped, *parts}, timeout=1.0)
                if stopped in done:
                    return
                for task in done:
                    name = parts[task]
                    part = self._child(name)
                    where = part.log_path if part else self.server.log_path
                    raise UpError(f"{name} {_fmt_exit(task.result())} (log: {where})")
                # `fabric pki issue/revoke` while we run: reload the user list.
                new = _inventory_stamp(self.config.pki_dir)
                if new != stamp:
                    stamp = new
                    try:
                        await self.server.reload()
                        self.say("reloaded the user list from the PKI inventory")
                    except NatsServerError as exc:
                        self.say(f"warning: {str(exc).splitlines()[0]}")
        finally:
            for task in (stopped, *parts):
                task.cancel()
            await asyncio.gather(stopped, *parts, return_exceptions=True)

    def _child(self, name: str) -> Child | None:
        return next((c for c in (self.controller, *self.nodes) if c and c.name == name), None)

    # --- stop -----------------------------------------------------------------

    async def stop(self) -> None:
        """Stop whatever runs, in order; safe to call after a partial start."""
        try:
            await self._stop_nodes_then_controller()
        finally:
            if self.server is not None:
                if self.server.running:
                    self.say("stopping nats-server")
                await self.server.stop()
            self._lock.release()

    async def _stop_nodes_then_controller(self) -> None:
        live = [c for c in self.nodes if c.running]
        controller = self.controller
        if live:
            self.say(f"stopping {', '.join(c.name for c in live)} (draining agents)")
        async with asyncio.TaskGroup() as tg:
            node_tasks = [
                tg.create_task(c.stop(self.config.node_stop_grace), name=c.name) for c in live
            ]
            if controller is not None and controller.running:
                tg.create_task(self._stop_controller(controller, node_tasks))
        for child, task in zip(live, node_tasks, strict=True):
            code = task.result()
            if code not in (0, None, -signal.SIGTERM):
                self.say(f"warning: {child.name} {_fmt_exit(code)} (log: {child.log_path})")

    async def _stop_controller(
        self, controller: Child, node_tasks: list[asyncio.Task[int | None]]
    ) -> None:
        if node_tasks:
            # The first node gone is enough: a controller outliving it would
            # re-place its agents on the nodes that are still draining.
            await asyncio.wait(node_tasks, return_when=asyncio.FIRST_COMPLETED)
        self.say(f"stopping {controller.name}")
        await controller.stop(10.0)


def _inventory_stamp(pki_dir: Path) -> tuple[int, int] | None:
    try:
        st = (pki_dir / "inventory.json").stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)
