"""Helpers behind the NATS fixtures in ``conftest.py`` (importable by any test).

* :func:`make_pki` - a PKI with one identity per role (:data:`IDENTITIES`).
* :func:`run_sync` - run a coroutine from a synchronous fixture, on a private
  event loop that leaves pytest-asyncio's loops alone. Servers are started and
  stopped this way so one server can outlive many tests (each test has its own
  loop); :class:`fabric.nats_server.NatsServer` keeps no loop-bound state.
* :class:`Clients` - connects as a named identity and closes every client at
  teardown.
* :class:`ErrorLog` - an ``error_cb`` that records errors, to observe
  permission violations (nats-py reports them only there).
* :func:`through_election` - a JetStream API read, asked again while a lost
  or restarted server's leaderships are elected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from fabric.connect import connect
from fabric.pki import Identity, init_pki, issue_identity

T = TypeVar("T")

# name -> role: the identities every test PKI holds.
IDENTITIES: dict[str, str] = {
    "ctl-1": "controller",
    "n1": "node",
    "n2": "node",
    "op-1": "operator",
    "view-1": "viewer",
    "work-1": "worker",
}


@dataclass(frozen=True)
class FabricPki:
    """A PKI directory and its identities, by name (``pki["ctl-1"]``)."""

    dir: Path
    identities: dict[str, Identity]

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def __getitem__(self, name: str) -> Identity:
        return self.identities[name]

    def issue(self, role: str, name: str) -> Identity:
        """Issue one more identity (only in a PKI the test owns: the server
        user list changes on the next reload)."""
        ident = issue_identity(self.dir, role, name)
        self.identities[name] = ident
        return ident

    def issue_again(self, role: str, name: str) -> Identity:
        """Replace ``name``'s certificate (``--force``): the old one is refused
        after the next reload."""
        ident = issue_identity(self.dir, role, name, force=True)
        self.identities[name] = ident
        return ident


def make_pki(pki_dir: Path, identities: dict[str, str] | None = None) -> FabricPki:
    """``init_pki`` in ``pki_dir`` plus ``identities`` (default :data:`IDENTITIES`)."""
    init_pki(pki_dir)
    issued = {
        name: issue_identity(pki_dir, role, name)
        for name, role in (IDENTITIES if identities is None else identities).items()
    }
    return FabricPki(dir=pki_dir, identities=issued)


async def until_delivered(
    publish: Callable[[bytes], Awaitable[None]], sub: Subscription, within: float = 10.0
) -> None:
    """Publish probes through ``publish`` until one reaches ``sub``; earlier
    probes still on their way are read off, so the next message on ``sub`` is
    whatever is published after this returns.

    Right after a config reload nats-server may still be applying it to the
    connections it keeps (CI saw a message published just after the reload's
    log line never arrive, about one run in ten); a test that means "a live
    connection still works" waits for that here instead of racing it.
    """
    async with asyncio.timeout(within):
        n = 0
        while True:
            n += 1
            want = b"probe-%d" % n
            await publish(want)
            try:
                while (await sub.next_msg(timeout=0.5)).data != want:
                    pass  # an earlier probe, delivered late
                return
            except nats.errors.TimeoutError:
                continue


async def through_election(read: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """``read()``, begun again until it succeeds or ``within`` seconds pass.

    While a lost or just restarted server's JetStream leaderships are being
    elected, the API either answers nothing (the request times out) or answers
    at once that no leader is there; a read begun then is begun again. CI saw
    both right after a server of the test cluster was killed or started.
    """
    last: Exception | None = None
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    return await read()
                except nats.errors.TimeoutError as e:
                    last = e  # the request itself waited
                except (nats.errors.Error, TimeoutError) as e:
                    last = e
                    await asyncio.sleep(0.2)  # wait-ok: answered at once, asked again shortly
    except TimeoutError as e:
        raise TimeoutError(f"no answer within {within} s; the last try: {last!r}") from e


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop (for synchronous fixtures).

    ``loop_factory`` keeps ``asyncio.Runner`` from installing its loop as the
    thread's current loop, which pytest-asyncio manages.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


class ErrorLog:
    """An ``error_cb`` that keeps every error and can wait for one.

    ``await log.wait_for("permissions violation for publish to \\"x\\"")``
    returns the first matching error or fails after ``within`` seconds.
    """

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self._changed = asyncio.Condition()

    async def __call__(self, exc: Exception) -> None:
        async with self._changed:
            self.errors.append(exc)
            self._changed.notify_all()

    def matching(self, text: str) -> list[Exception]:
        return [e for e in self.errors if text.lower() in str(e).lower()]

    @property
    def violations(self) -> list[Exception]:
        return self.matching("permissions violation")

    async def wait_for(self, text: str, within: float = 5.0) -> Exception:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: bool(self.matching(text)))
            return self.matching(text)[0]


class Clients:
    """Connects as a PKI identity; closes everything it opened in :meth:`aclose`.

    ``await clients("ctl-1", urls)`` returns a connected ``nats.aio.client.Client``;
    keyword arguments go to :func:`fabric.connect.connect` (``error_cb=``,
    ``reconnected_cb=``...).
    """

    def __init__(self, pki: FabricPki, default_urls: Sequence[str] | str | None = None) -> None:
        self.pki = pki
        self.default_urls = default_urls
        self._opened: list[Client] = []

    async def __call__(
        self, name: str, urls: Sequence[str] | str | None = None, **options: Any
    ) -> Client:
        target = urls if urls is not None else self.default_urls
        if target is None:
            raise ValueError("no URL given and no default server")
        ident = self.pki[name]
        nc = await connect(
            target, ca=self.pki.ca, cert=ident.cert, key=ident.key, name=name, **options
        )
        self._opened.append(nc)
        return nc

    async def aclose(self) -> None:
        for nc in self._opened:
            if not nc.is_closed:
                # A client whose server is gone may fail to flush on close;
                # teardown must still close the rest.
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                    await nc.close()
        self._opened.clear()
