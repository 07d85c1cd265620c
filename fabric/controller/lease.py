"""The leader lease: one key in the ``fabric_lease`` bucket, held by one controller.

::

    standby ──create(key, ttl) ok──▶ leader ──update(last=rev) every ttl/3──▶ leader
       ▲  create refused: poll again       │ update refused (someone else holds it),
       │  every ttl/3                       │ or no successful renew for 2/3 ttl
       └────────────────────────────────────┘

Every message in the bucket expires after ``ttl`` (the bucket's max age, and
the create's own message TTL), so a leader that dies stops renewing and its
key disappears; a standby's next ``create`` wins. The leader gives up *before*
its key can expire (2/3 ttl after its last acknowledged renew), so two
controllers never both believe they lead while the server agrees with one.

Fencing: :meth:`Lease.valid` is the leader's check by time (cheap, local);
:meth:`Lease.fence` adds the check by value, right before a write: the key on
the server must still hold this holder's acquisition (holder, nonce) at the
revision held or a later one of its own renewals. A leader that was paused
(its monotonic clock jumps) or whose key was taken fails one or the other and
gets :class:`NotLeader` instead of writing. What is left is the time between
that read and the write itself (one round trip): closing it needs the write
and the lease check in one atomic JetStream batch, which nats-py cannot send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from fabric.cancelled import raise_if_cancelled
from schemas.codec import encode
from schemas.common import utc_now

__all__ = ["LEASE_KEY", "Lease", "LeaseValue", "NotLeader"]

log = logging.getLogger(__name__)

LEASE_KEY = "leader"

OnChange = Callable[[bool], Awaitable[None]]


class NotLeader(Exception):
    """This controller does not (or can no longer prove it does) hold the lease."""


class LeaseValue(msgspec.Struct, frozen=True, kw_only=True):
    holder: str
    acquired_at: datetime
    nonce: str = ""
    """Unique per acquisition: two controllers given one name still differ."""


class Lease:
    """Acquire, renew and lose the lease; ``on_change(True/False)`` on each change."""

    def __init__(
        self,
        kv: KeyValue,
        holder: str,
        *,
        ttl: float = 3.0,
        on_change: OnChange | None = None,
        key: str = LEASE_KEY,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._kv = kv
        self.holder = holder
        self.ttl = ttl
        self._on_change = on_change
        self._key = key
        self.is_leader = False
        self.revision: int | None = None
        self._last_ok = 0.0
        self._value = b""

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def valid(self) -> bool:
        """True while this controller leads and its last renew is recent enough."""
        return self.is_leader and self._now() - self._last_ok < self.ttl * 2 / 3

    async def _set(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if not leader:
            self.revision = None
        log.info("%s %s the lease", self.holder, "holds" if leader else "lost")
        if self._on_change is not None:
            await self._on_change(leader)

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this controller leads."""
        if self.is_leader:
            return True
        value = LeaseValue(holder=self.holder, acquired_at=utc_now(), nonce=uuid.uuid4().hex)
        self._value = encode(value)
        started = self._now()
        try:
            async with asyncio.timeout(self.interval):
                revision = await self._kv.create(self._key, self._value, msg_ttl=self.ttl)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.errors.Error, TimeoutError):
            return False  # held by another, or the server is unreachable: stay standby
        self.revision = revision
        # Counted from before the request: the key may have been written at once.
        self._last_ok = started
        await self._set(True)
        return True

    async def renew(self) -> bool:
        """Extend the lease held; False (and stepped down if it is gone) otherwise."""
        if not self.is_leader:
            return False
        started = self._now()
        try:
            async with asyncio.timeout(self.interval):
                revision = await self._kv.update(self._key, self._value, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._set(False)  # expired and taken, or deleted
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("lease renew failed: %s", exc)
            if not self.valid():
                await self._set(False)
            return False
        self.revision = revision
        self._last_ok = started
        return True

    async def fence(self) -> None:
        """Raise :class:`NotLeader` unless the lease is still ours, by time and on the server.

        Called right before each write the leader makes. A revision newer than
        the one held is accepted only with this acquisition's own value: it is
        a renewal of ours still in flight.
        """
        if not self.valid():
            raise NotLeader(f"{self.holder}: lease not renewed within {self.ttl * 2 / 3:g}s")
        held = self.revision
        try:
            async with asyncio.timeout(self.interval):
                entry = await self._kv.get(self._key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise NotLeader(f"{self.holder}: the lease key is gone") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise NotLeader(f"{self.holder}: cannot confirm the lease: {exc}") from None
        if held is None or entry.revision is None or entry.revision < held:
            raise NotLeader(f"{self.holder}: lease revision {entry.revision} is not {held}")
        if entry.value != self._value:
            raise NotLeader(f"{self.holder}: the lease is held by another acquisition")
        if not self.valid():
            raise NotLeader(f"{self.holder}: lease expired while being confirmed")

    async def run(self) -> None:
        """Run until cancelled; on cancel, release the lease if held."""
        try:
            while True:
                raise_if_cancelled()
                if self.is_leader:
                    await self.renew()
                else:
                    await self.acquire()
                await asyncio.sleep(self.interval)
        finally:
            await self._release()

    async def _release(self) -> None:
        # A clean shutdown hands over at once instead of after a ttl.
        if not self.is_leader or self.revision is None:
            return
        revision, self.revision = self.revision, None
        self.is_leader = False
        with contextlib.suppress(nats.errors.Error, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(1.0):
                await self._kv.delete(self._key, last=revision)
