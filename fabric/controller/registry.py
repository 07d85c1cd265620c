"""The registry in JetStream KV: typed reads and compare-and-set writes.

Two controllers never clobber each other: every write names the revision it
was computed from (``kv.update(key, value, last=rev)``; ``kv.create`` for a
key that must not exist), and the server refuses a stale one. A refusal is
``ContractError(CONFLICT)``; :func:`mutate` re-reads and retries a few times
before giving up with that code.

Writes the leader makes also pass a ``guard`` (its lease's
:meth:`~fabric.controller.lease.Lease.fence`), awaited right before each write
attempt: a controller that no longer holds the lease raises there and writes
nothing, even where compare-and-set alone would let the write through.

Buckets and keys:

``fabric_nodes``   node id -> :class:`NodeEntry` (what the node said when it
                   registered, plus the operator's cordon/drain flags).
``fabric_agents``  deployment name -> :class:`~schemas.api.DeploymentRecord`.
``fabric_observed`` node id -> what it last reported running, written by the
                   leader on change (:mod:`~fabric.controller.observed`).

:class:`Mirror` keeps a local copy of a bucket from a KV watch, for the
reconcile loop and for discovery, which must not read KV on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from schemas.codec import decode, encode
from schemas.errors import ContractError, ErrorCode
from schemas.node import NodeInfo

__all__ = ["Guard", "Mirror", "Mutation", "NodeEntry", "delete", "mutate", "read", "write"]

T = TypeVar("T")

Guard = Callable[[], Awaitable[None]]
"""Awaited right before a write; raises to forbid it (the leader's lease fence)."""

_MAX_VALUE = 8 * 1024 * 1024


class NodeEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One node in ``fabric_nodes``. Heartbeats are not written here (1 Hz per
    node would be the registry's whole write load); ``lost`` is set by the
    leader when it declares the node lost and cleared when it registers."""

    info: NodeInfo
    registered_at: datetime
    cordoned: bool = False
    draining: bool = False
    lost: bool = False


def _conflict(bucket: str, key: str) -> ContractError:
    return ContractError(
        ErrorCode.CONFLICT, f"{bucket}/{key} was changed by someone else; try again"
    )


async def read(kv: KeyValue, key: str, type_: type[T]) -> tuple[T, int] | None:
    """The value at ``key`` and its revision, or None when absent or deleted."""
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if entry.value is None or entry.revision is None:
        return None
    return decode(entry.value, type_, max_bytes=_MAX_VALUE), entry.revision


async def write(
    kv: KeyValue, key: str, value: object, last: int | None, *, guard: Guard | None = None
) -> int:
    """Store ``value`` if ``key`` is still at revision ``last`` (None: absent)."""
    data = encode(value)
    if guard is not None:
        await guard()
    try:
        if last is None:
            return await kv.create(key, data)
        return await kv.update(key, data, last=last)
    except nats.js.errors.KeyWrongLastSequenceError:
        raise _conflict(kv._name, key) from None


# JetStream's "wrong last sequence": nats-py maps it to its own class on
# update but not on delete, where it arrives as a plain BadRequestError.
_WRONG_LAST_SEQUENCE = 10071


async def delete(kv: KeyValue, key: str, last: int, *, guard: Guard | None = None) -> None:
    if guard is not None:
        await guard()
    try:
        await kv.delete(key, last=last)
    except nats.js.errors.APIError as exc:
        if exc.err_code == _WRONG_LAST_SEQUENCE:
            raise _conflict(kv._name, key) from None
        raise


class Mutation(NamedTuple, Generic[T]):
    value: T | None
    """What is stored now (None: absent)."""
    revision: int | None
    changed: bool


async def mutate(
    kv: KeyValue,
    key: str,
    type_: type[T],
    change: Callable[[T | None], T | None],
    *,
    attempts: int = 5,
    guard: Guard | None = None,
) -> Mutation[T]:
    """Apply ``change`` to the current value with compare-and-set, retrying on
    conflict. ``change`` returns the new value, or the value it was given (or
    None for an absent key) to leave it alone; it may raise ContractError to
    refuse. ``guard`` runs before each write attempt (see :func:`write`).
    Returns the value now stored, its revision and whether this call changed
    it."""
    for attempt in range(attempts):
        current = await read(kv, key, type_)
        before, revision = (current[0], current[1]) if current else (None, None)
        after = change(before)
        if after is None or after == before:
            return Mutation(before, revision, False)
        try:
            revision = await write(kv, key, after, revision, guard=guard)
        except ContractError as exc:
            if exc.code is not ErrorCode.CONFLICT or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.005 * (attempt + 1))
            continue
        return Mutation(after, revision, True)
    raise _conflict(kv._name, key)  # unreachable: the last attempt raises


class Mirror(Generic[T]):
    """A local, eventually current copy of one bucket: key -> (value, revision).

    ``ready`` is set once the initial values are in. A value that fails to
    decode is skipped (and counted) rather than stopping the watch.
    """

    def __init__(self, kv: KeyValue, type_: type[T]) -> None:
        self._kv = kv
        self._type = type_
        self.items: dict[str, tuple[T, int]] = {}
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        self.version = 0
        """Counts changes: equal readings mean nothing changed in between."""
        self.bad_values = 0

    def apply(self, key: str, value: T | None, revision: int) -> None:
        """Record a change made here, before the watch brings it back."""
        known = self.items.get(key)
        if known is not None and known[1] >= revision:
            return
        if value is None:
            self.items.pop(key, None)
        else:
            self.items[key] = (value, revision)
        self.version += 1
        self.changed.set()

    async def run(self) -> None:
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    self.ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.items.pop(entry.key, None)
                    self.version += 1
                    self.changed.set()
                    continue
                try:
                    value = decode(entry.value, self._type, max_bytes=_MAX_VALUE)
                except ContractError:
                    self.bad_values += 1
                    continue
                self.apply(entry.key, value, entry.revision or 0)
                self.ready.set()
        finally:
            with contextlib.suppress(nats.errors.Error, asyncio.CancelledError):
                await watcher.stop()
