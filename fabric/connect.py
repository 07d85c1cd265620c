"""The one way the fabric opens a NATS connection: mutual TLS, fleet-sized timings.

Settings come from arguments or, when an argument is None, from the
environment: ``FABRIC_NATS_URL`` (comma-separated for a cluster),
``FABRIC_CA``, ``FABRIC_CERT``, ``FABRIC_KEY``.

The first connection fails fast with :class:`ConnectError` (one line saying
why) instead of retrying forever; once connected, the client reconnects
without limit, trying every URL, and notices a dead server within a few
seconds thanks to a short ping interval.

A certificate rotated on disk is picked up when the connection drops: each
DN names one certificate, so the servers' reload after a re-issue closes the
old certificate's connections, and the client reconnects with the files now
at its ``cert``/``key`` paths (read again whenever they changed, and used
only once the pair loads), with no restart of the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from cryptography import x509
from cryptography.x509.oid import NameOID
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.ids import is_valid_id

__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "ENV_URL",
    "ConnectError",
    "connect",
    "inbox_prefix",
    "js_publish",
    "parse_urls",
    "tls_context",
]

log = logging.getLogger(__name__)

ENV_URL = "FABRIC_NATS_URL"
ENV_CA = "FABRIC_CA"
ENV_CERT = "FABRIC_CERT"
ENV_KEY = "FABRIC_KEY"

# Reconnect quickly and forever: a fleet outlives any one server. A dead peer
# that never closes its socket is noticed after PING_INTERVAL * MAX_PINGS.
DEFAULTS: Mapping[str, Any] = {
    "connect_timeout": 2,
    "reconnect_time_wait": 0.5,
    "max_reconnect_attempts": -1,
    "allow_reconnect": True,
    "ping_interval": 3,
    "max_outstanding_pings": 2,
}

_CLOSE_GRACE = 1.0  # seconds

ErrorCallback = Callable[[Exception], Awaitable[None]]


class ConnectError(Exception):
    """Could not connect: missing settings, unreadable files, or a refusal."""


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``, blanks dropped."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    return [p.strip() for p in parts if p and p.strip()]


def tls_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """Client context: verify the server against ``ca``, present ``cert``/``key``."""
    # Checked first: ssl's own error for a missing file does not name it.
    for what, path in (("CA certificate", ca), ("client certificate", cert), ("client key", key)):
        if not Path(path).is_file():
            raise ConnectError(f"TLS file not found: {what} {path}")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConnectError(f"cannot load TLS files (ca={ca}, cert={cert}): {exc}") from exc
    return ctx


def _setting(value: str | Path | None, env: str, what: str) -> Path:
    if value is None:
        value = os.environ.get(env) or None
    if value is None:
        raise ConnectError(f"no {what}: pass it or set {env}")
    return Path(value)


class _ChainReloader:
    """Loads the client certificate again into the live context when its files change.

    nats-py keeps the one ``SSLContext`` for every reconnect; loading a new
    chain into it changes what the next handshake presents. A pair that does
    not load (a copy half done, a key that does not match) is left alone and
    tried again at the next call.
    """

    def __init__(self, ctx: ssl.SSLContext, ca: Path, cert: Path, key: Path) -> None:
        self._ctx, self._ca, self._cert, self._key = ctx, ca, cert, key
        self._stamp = self._read_stamp()
        self.reloads = 0

    def _read_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple(
                (st.st_ino, st.st_size, st.st_mtime_ns)
                for st in (self._cert.stat(), self._key.stat())
            )
        except OSError:
            return None

    def __call__(self) -> bool:
        """Reload when the files changed; True if the context now holds a new chain."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            # Checked on a scratch context first: a failed load_cert_chain may
            # leave a context with the new certificate and the old key.
            tls_context(self._ca, self._cert, self._key)
            self._ctx.load_cert_chain(str(self._cert), str(self._key))
        except (ConnectError, ssl.SSLError, OSError) as exc:
            log.warning("client certificate %s changed but does not load yet: %s", self._cert, exc)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("client certificate %s reloaded for the next connection", self._cert)
        return True


def inbox_prefix(cert: Path) -> str | None:
    """``_INBOX.<name>`` for the identity named in ``cert``'s CN, else None.

    The server lets each identity subscribe only to its own inboxes (see
    :mod:`fabric.permissions`), so replies to a request must come back there.
    """
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = names[0].value if names else None
    if not isinstance(name, str) or not is_valid_id(name):
        return None
    return f"_INBOX.{name}"


class _Client(Client):
    """nats-py's client, with one repair and one change.

    The repair: a PONG for a flush that timed out.

    nats-py 2.16 keeps a timed-out flush's future (cancelled) in its queue of
    PINGs awaiting a PONG. When the late PONG comes (a cut link that heals),
    it set a result on that cancelled future: InvalidStateError ended the read
    loop, and the client heard nothing until its pings declared it stale and
    it reconnected, seconds later. PONGs answer PINGs in order, so that PONG
    belongs to the cancelled one: it is taken off and nothing else resolved.

    The change: fewer, larger socket writes (:meth:`_flusher`).
    """

    async def _flusher(self) -> None:
        # nats-py's flusher, but it lets the loop run once more before each
        # write: the callbacks already due (a batch of acks, records, events
        # made by other tasks) join the same write. On loopback TLS one send
        # costs far more than the bytes in it, so a busy dispatcher made one
        # syscall per few messages; the wait is one loop turn, microseconds.
        assert self._transport, "Client.connect must be called first"
        assert self._flush_queue, "Client.connect must be called first"
        while True:
            if not self.is_connected or self.is_connecting:
                break
            future: asyncio.Future[None] = await self._flush_queue.get()
            try:
                await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()
            except OSError as e:
                await self._error_cb(e)
                await self._process_op_err(e)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break  # RuntimeError: the event loop is closed
            finally:
                if not future.done():  # it may have been cancelled
                    future.set_result(None)

    async def _process_pong(self) -> None:
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s: %s", type(exc).__name__, exc)


def _explain(exc: BaseException, last: BaseException | None) -> str:
    """One line saying why the first connection failed."""
    cause = last if isinstance(exc, nats.errors.NoServersError) and last is not None else exc
    text = str(cause).strip() or type(cause).__name__
    if isinstance(cause, nats.errors.AuthorizationError) or "authorization violation" in (
        text.lower()
    ):
        return (
            "the server refused this certificate (Authorization Violation): not issued or revoked?"
        )
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return f"TLS handshake failed: {text}"
    if isinstance(cause, nats.errors.UnexpectedEOF | ConnectionResetError | BrokenPipeError):
        return "the server closed the connection (no or unacceptable client certificate?)"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(cause, asyncio.TimeoutError):
        return "timed out"
    if isinstance(cause, nats.errors.NoServersError):
        return "no server reachable"
    return f"{type(cause).__name__}: {text}"


async def connect(
    urls: str | Sequence[str] | None = None,
    *,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    name: str | None = None,
    **overrides: Any,
) -> Client:
    """Connect to the fabric's NATS over mutual TLS and return the client.

    Arguments left as None are read from ``FABRIC_NATS_URL`` / ``FABRIC_CA`` /
    ``FABRIC_CERT`` / ``FABRIC_KEY``. ``overrides`` go to ``nats.connect`` as
    they are (``error_cb``, ``reconnected_cb``, ``ping_interval``...); an
    ``error_cb`` given there replaces the default one, which logs.

    Each URL is tried (twice at most) for the first connection, then
    :class:`ConnectError` is raised: ``allow_reconnect`` and
    ``max_reconnect_attempts`` apply from the first success on.
    """
    if urls is None:
        urls = os.environ.get(ENV_URL) or None
        if urls is None:
            raise ConnectError(f"no NATS URL: pass one or set {ENV_URL}")
    servers = parse_urls(urls)
    if not servers:
        raise ConnectError(f"no NATS URL: pass one or set {ENV_URL}")
    ca_path = _setting(ca, ENV_CA, "CA certificate")
    cert_path = _setting(cert, ENV_CERT, "client certificate")
    key_path = _setting(key, ENV_KEY, "client key")
    ctx = tls_context(ca_path, cert_path, key_path)

    options: dict[str, Any] = {**DEFAULTS, **overrides}
    user_error_cb: ErrorCallback = options.pop("error_cb", None) or _log_error
    user_disconnected_cb: Callable[[], Awaitable[None]] | None = options.pop(
        "disconnected_cb", None
    )
    reload_chain = _ChainReloader(ctx, ca_path, cert_path, key_path)
    allow_reconnect = bool(options.pop("allow_reconnect"))
    max_reconnects = int(options.pop("max_reconnect_attempts"))
    options["name"] = name or f"fabric-{cert_path.stem}"
    prefix = inbox_prefix(cert_path)
    if prefix is not None:
        options.setdefault("inbox_prefix", prefix)

    connected = False
    last_error: BaseException | None = None

    async def error_cb(exc: Exception) -> None:
        # Before the first success the failure is reported by ConnectError,
        # so it is only kept (and logged quietly) rather than shouted.
        nonlocal last_error
        if connected:
            # A reconnect refused for the old certificate: the new one may be there now.
            reload_chain()
            await user_error_cb(exc)
        else:
            last_error = exc
            log.debug("nats connect attempt failed: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        # Before the reconnect attempts: present the rotated certificate, if any.
        reload_chain()
        if user_disconnected_cb is not None:
            await user_disconnected_cb()

    nc = _Client()
    try:
        # nats-py retries the first connect forever when reconnects are
        # unlimited; a bounded first attempt makes a wrong URL or a refused
        # certificate an immediate, explained error.
        await nc.connect(
            servers=servers,
            tls=ctx,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            **options,
        )
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        # A failed TLS upgrade has already closed the socket, and nats-py's
        # close() would then wait forever on the stream it replaced.
        if not isinstance(exc, ssl.SSLError):
            await _close_quietly(nc)
        reason = _explain(exc, last_error)
        raise ConnectError(f"cannot connect to {', '.join(servers)}: {reason}") from exc
    except BaseException:
        await _close_quietly(nc)
        raise
    connected = True
    # nats-py reads these options whenever a connection drops, so setting them
    # now turns on unlimited reconnects for the life of the client.
    nc.options["allow_reconnect"] = allow_reconnect
    nc.options["max_reconnect_attempts"] = max_reconnects
    return nc


async def _close_quietly(nc: Client) -> None:
    if nc.is_closed:
        return
    try:
        # Bounded: closing a connection that never finished its handshake
        # must not hang the caller that is about to report the failure.
        async with asyncio.timeout(_CLOSE_GRACE):
            await nc.close()
    except (TimeoutError, nats.errors.Error, OSError):
        log.debug("closing a failed connection", exc_info=True)


# JetStream answers these while a stream leader is being elected or a server
# is going away; the publish may or may not have been stored, which the same
# Nats-Msg-Id makes safe to find out by retrying.
_RETRYABLE = (
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
    TimeoutError,
)


async def js_publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    msg_id: str,
    headers: Mapping[str, str] | None = None,
    stream: str | None = None,
    attempt_timeout: float = 2.0,
    deadline: float = 30.0,
    on_retry: Callable[[Exception, int], object] | None = None,
) -> PubAck:
    """JetStream publish that survives a leader election or a lost server.

    nats-py does not retry a publish; this does, always with the same
    ``Nats-Msg-Id``, so a message stored by an attempt whose ack was lost
    comes back as ``duplicate=True`` instead of being stored twice. Raises
    the last error once ``deadline`` seconds have passed. ``on_retry(error,
    attempt)`` is called before each retry (for logs and metrics).
    """
    hdrs = {**(headers or {}), "Nats-Msg-Id": msg_id}
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + deadline
    backoff = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            return await js.publish(
                subject, payload, timeout=attempt_timeout, stream=stream, headers=hdrs
            )
        except _RETRYABLE as exc:
            if loop.time() + backoff >= stop_at:
                raise
            if on_retry is not None:
                on_retry(exc, attempt)
        # Back off a little so an election in progress is not flooded.
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 0.5)
