"""Helpers for the node-side chaos scenarios (tests/test_chaos_*.py and bench/chaos/).

* :class:`NodeProc` - one real ``fabric-node`` process (``python -m
  node_agent.main``), its log in a file, stopped by pid.
* :class:`Beats` - heartbeats of one node as received, with the largest gap.
* :class:`Prober` - sends a command every ``period`` and keeps every latency
  (a command not answered in time counts as a failure).
* :class:`Events` - CloudEvents received on ``events.>``.
* :class:`RawSubscriber` - a TLS client speaking raw NATS protocol that
  subscribes and then never reads its socket: the slow consumer.
* :func:`spare_user` - a system user running no process (for RLIMIT_NPROC).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from agents.harness import until
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import FabricPki

from fabric.tokens import TokenIssuer
from schemas import subjects
from schemas.codec import decode, decode_reply, encode
from schemas.errors import ErrorReply
from schemas.event import CloudEvent
from schemas.node import NodeHeartbeat

__all__ = [
    "Beats",
    "Events",
    "NodeProc",
    "Prober",
    "RawSubscriber",
    "command",
    "spare_user",
]


async def command(
    nc: Client,
    subject: str,
    message: Any,
    timeout: float = 10.0,  # noqa: ASYNC109
    decoder: Callable[[bytes], Any] = decode_reply,
) -> Any:
    msg = await nc.request(subject, encode(message), timeout=timeout)
    return decoder(msg.data)


class NodeProc:
    """A ``fabric-node`` subprocess; ``stop()`` SIGTERMs it (drain), SIGKILL after 20 s."""

    def __init__(
        self,
        pki: FabricPki,
        url: str,
        state_dir: Path,
        log_path: Path,
        node_id: str = "n1",
        *,
        heartbeat: float = 0.2,
        metrics: float = 0.5,
    ) -> None:
        self.node_id = node_id
        self.state_dir = state_dir
        self.log_path = log_path
        ident = pki[node_id]
        env = {
            **os.environ,
            "FABRIC_NATS_URL": url,
            "FABRIC_CA": str(pki.ca),
            "FABRIC_CERT": str(ident.cert),
            "FABRIC_KEY": str(ident.key),
        }
        argv = [
            sys.executable, "-m", "node_agent.main",
            "--node-id", node_id,
            "--state-dir", str(state_dir),
            "--token-key", str(pki.dir / "signing.pub"),
            "--heartbeat-interval", str(heartbeat),
            "--metrics-interval", str(metrics),
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int | None:
        """SIGTERM (drain) and wait; SIGKILL after 20 s. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await until(lambda: self.proc.poll() is not None, within=20, step=0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


class Beats:
    """Receive times (loop clock) of one node's heartbeats."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.last: NodeHeartbeat | None = None

    async def start(self, nc: Client, node_id: str) -> None:
        await nc.subscribe(subjects.node_heartbeat(node_id), cb=self._on_beat)
        await nc.flush()

    async def _on_beat(self, msg: Msg) -> None:
        self.at.append(asyncio.get_running_loop().time())
        self.last = decode(msg.data, NodeHeartbeat)

    def mark(self) -> int:
        return len(self.at)

    def max_gap(self, since: int = 0, until_now: bool = True) -> float:
        """The largest gap between heartbeats from index ``since`` on, counting
        the time since the last one (a node that stopped beating has a growing gap)."""
        times = self.at[max(0, since - 1) :]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        if until_now and times:
            gaps.append(asyncio.get_running_loop().time() - times[-1])
        return max(gaps, default=float("inf"))


@dataclass
class Prober:
    """Sends ``make()`` to ``subject`` every ``period`` s; keeps latencies and failures."""

    nc: Client
    subject: str
    make: Callable[[], Any]
    period: float = 0.2
    timeout: float = 5.0
    decoder: Callable[[bytes], Any] = decode_reply
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    replies: list[Any] = field(default_factory=list)
    stopped: bool = False
    task: asyncio.Task[None] | None = None

    def start(self) -> Prober:
        self.task = asyncio.create_task(self.run())
        return self

    async def stop(self) -> None:
        """Stop probing. The flag, not only the cancel: Python 3.11's wait_for (inside
        nats-py's request) can swallow a cancellation that lands as its reply does."""
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped:
            started = loop.time()
            try:
                reply = await command(
                    self.nc, self.subject, self.make(), self.timeout, self.decoder
                )
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                self.latencies.append(loop.time() - started)
                self.replies.append(reply)
                if isinstance(reply, ErrorReply):
                    self.failures.append(f"{reply.code}: {reply.message}")
            # The probe's period, not a synchronisation.
            await asyncio.sleep(max(0.0, started + self.period - loop.time()))  # wait-ok

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))


class Events:
    """CloudEvents on ``events.>`` as received."""

    def __init__(self) -> None:
        self.items: list[CloudEvent] = []

    async def start(self, nc: Client, subject: str = "events.>") -> None:
        await nc.subscribe(subject, cb=self._on)
        await nc.flush()

    async def _on(self, msg: Msg) -> None:
        self.items.append(decode(msg.data, CloudEvent))

    def of(self, kind: str, subject: str | None = None) -> list[CloudEvent]:
        return [
            e for e in self.items if e.kind == kind and (subject is None or e.subject == subject)
        ]


class RawSubscriber:
    """A viewer that subscribes over raw NATS protocol, then never reads again.

    Its receive buffer is made small so the server's writes block early; the
    server is then left to notice it is a slow consumer and cut it.
    """

    def __init__(self, host: str, port: int, ca: Path, cert: Path, key: Path) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(5)
        raw.connect((host, port))
        info = b""
        while not info.endswith(b"\r\n"):  # INFO {...}\r\n comes first, in plaintext
            chunk = raw.recv(1)
            if not chunk:
                raise ConnectionError("server closed before INFO")
            info += chunk
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.sids = 0

    def subscribe(self, subjects_: Sequence[str]) -> None:
        opts = {"verbose": False, "pedantic": False, "tls_required": True, "name": "never-reads"}
        lines = [f"CONNECT {json.dumps(opts)}\r\n"]
        for subject in subjects_:
            self.sids += 1
            lines.append(f"SUB {subject} {self.sids}\r\n")
        lines.append("PING\r\n")
        self.sock.sendall("".join(lines).encode())
        # Read until our PONG: the subscriptions are in place. Then never read again.
        seen = b""
        deadline = time.monotonic() + 5
        while b"PONG\r\n" not in seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no PONG from the server: {seen[-200:]!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection: {seen[-200:]!r}")
            seen += chunk
            if b"-ERR" in seen:
                raise ConnectionError(seen.decode(errors="replace"))

    def cut_by_server(self) -> bool:
        """True once the server has closed the connection (reads what is left, without blocking)."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return True
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def spare_user(
    candidates: Sequence[str] = ("games", "lp", "news", "uucp", "irc", "list"),
) -> str | None:
    """A system user that exists and runs no process now (RLIMIT_NPROC counts per user)."""
    busy = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for name in candidates:
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        if uid != 0 and uid not in busy:
            return name
    return None


def user_pids(user: str) -> list[int]:
    uid = pwd.getpwnam(user).pw_uid
    out = []
    for p in psutil.process_iter(["uids", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != "zombie":
                out.append(p.pid)
    return out


def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", issuer="tests")
