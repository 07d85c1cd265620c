"""Stored publishes coalesced into JetStream atomic batches.

A dispatcher writes several stored messages per task (its record when it
starts, its record and its event when it ends). Each stored publish waits
for its own PubAck, and in nats-py that round trip costs the client about
four times the publish itself. :class:`AtomicWriter` gathers the writes
made to one stream while its previous commit is in flight and sends them as
one atomic batch (nats-server 2.12+, ``allow_atomic`` on the stream): every
message but the last is a plain publish, and one PubAck answers them all.

The contract for a caller is that of one ``js.publish`` per message, with
the same headers (``Nats-Expected-Last-Subject-Sequence``,
``Nats-Msg-Id``): :meth:`AtomicWriter.write` returns where the message was
stored, or raises :class:`WriteRefused` with the server's error code. A
batch is all or nothing, so when its commit is refused (one record changed
meanwhile, a message id already stored, a server lost) every message of it
is published again on its own, which gives each its own answer. Writing the
same message twice is harmless by construction: record writes name the
revision they expect and events carry their ``Nats-Msg-Id``.

One commit per stream at a time keeps the server's limit on open batches
out of reach and makes the batching natural: under load a commit carries
everything that arrived during the previous one; when idle, a lone write
goes out at once as an ordinary stored publish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

__all__ = [
    "MAX_BATCH",
    "AtomicWriter",
    "WriteRefused",
    "Written",
    "allow_atomic",
]

log = logging.getLogger(__name__)

MAX_BATCH = 256
"""Messages per commit; nats-server accepts up to 1,000."""

WRONG_LAST_SEQUENCE = 10071
"""JetStream's code for a ``Nats-Expected-Last-Subject-Sequence`` mismatch."""


class WriteRefused(Exception):
    """JetStream refused one stored publish; ``code`` is its ``err_code``."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {code})")
        self.code = code
        self.description = description

    @property
    def wrong_last_sequence(self) -> bool:
        return self.code == WRONG_LAST_SEQUENCE


@dataclass(frozen=True, slots=True)
class Written:
    seq: int
    duplicate: bool = False


@dataclass(slots=True)
class _Write:
    subject: str
    payload: bytes
    headers: Mapping[str, str]
    done: asyncio.Future[Written] = field(default_factory=lambda: _future())


def _future() -> asyncio.Future[Written]:
    return asyncio.get_running_loop().create_future()


async def allow_atomic(js: JetStreamContext, stream: str, *, direct: bool = False) -> bool:
    """Turn on ``allow_atomic`` (and ``allow_direct`` with ``direct``) for ``stream``;
    False when the server cannot."""
    try:
        info = await js.stream_info(stream)
        config = info.config
        if config.allow_atomic and (config.allow_direct or not direct):
            return True
        config.allow_atomic = True
        if direct:
            config.allow_direct = True
        await js.update_stream(config)
        return True
    except (nats.errors.Error, TimeoutError) as exc:
        log.info("stream %s: atomic batches not available (%s)", stream, exc)
        return False


class AtomicWriter:
    """Coalesces stored publishes to one stream; see the module docstring.

    ``atomic=False`` (a server without atomic batches): every write is an
    ordinary stored publish, concurrent, with the same contract.
    """

    def __init__(
        self, nc: Client, stream: str, *, atomic: bool = True, timeout: float = 5.0
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.atomic = atomic
        self.timeout = timeout
        self._pending: list[_Write] = []
        self._committing: asyncio.Task[None] | None = None
        self.commits = 0
        self.refused_batches = 0

    async def write(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> Written:
        if not self.atomic:
            return await self._single(subject, payload, dict(headers or {}))
        item = _Write(subject, payload, headers or {})
        self._pending.append(item)
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit_all())
        # The commit task answers every future, also when it is cancelled.
        return await asyncio.shield(item.done)

    async def _commit_all(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    await self._commit(batch)
                except BaseException as exc:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(_as_error(exc))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
        finally:
            self._committing = None
            for item in self._pending:
                if not item.done.done():
                    item.done.set_exception(nats.errors.ConnectionClosedError())
            self._pending.clear()

    async def _commit(self, batch: list[_Write]) -> None:
        if len(batch) == 1:
            await self._answer_one(batch[0])
            return
        batch_id = secrets.token_hex(12)
        last = len(batch)
        try:
            for n, item in enumerate(batch[:-1], 1):
                headers = {**item.headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n)}
                await self.nc.publish(item.subject, item.payload, headers=headers)
            item = batch[-1]
            headers = {
                **item.headers,
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": str(last),
                "Nats-Batch-Commit": "1",
            }
            reply = await self.nc.request(item.subject, item.payload, self.timeout, headers=headers)
            ack = _pub_ack(reply.data)
        except (nats.errors.Error, TimeoutError, WriteRefused) as exc:
            # All or nothing: each message gets its own answer on its own.
            self.refused_batches += 1
            log.debug("atomic batch of %d to %s not committed: %s", last, self.stream, exc)
            await asyncio.gather(*(self._answer_one(item) for item in batch))
            return
        self.commits += 1
        first = ack.seq - last + 1
        for n, item in enumerate(batch):
            if not item.done.done():
                item.done.set_result(Written(first + n))

    async def _answer_one(self, item: _Write) -> None:
        try:
            written = await self._single(item.subject, item.payload, dict(item.headers))
        except Exception as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if not item.done.done():
            item.done.set_result(written)

    async def _single(self, subject: str, payload: bytes, headers: dict[str, str]) -> Written:
        reply = await self.nc.request(subject, payload, self.timeout, headers=headers or None)
        return _pub_ack(reply.data)


def _pub_ack(data: bytes) -> Written:
    try:
        answer = json.loads(data)
    except ValueError:
        raise WriteRefused(0, f"not a PubAck: {data[:120]!r}") from None
    if not isinstance(answer, dict):
        raise WriteRefused(0, f"not a PubAck: {data[:120]!r}")
    error = answer.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise WriteRefused(0, str(error)[:200])
        raise WriteRefused(int(error.get("err_code") or 0), str(error.get("description", "")))
    seq = answer.get("seq")
    if not isinstance(seq, int):
        raise WriteRefused(0, f"PubAck without a sequence: {data[:120]!r}")
    return Written(seq, bool(answer.get("duplicate", False)))


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncio.CancelledError):
        return nats.errors.ConnectionClosedError()
    return exc
