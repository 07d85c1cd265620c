"""Batching an agent's new stdout/stderr lines for ``agents.<agent_id>.logs``.

Lines are published only while someone follows them (a ``logs`` command with
``follow`` seconds, renewed by asking again) or when the spec says
``logs.publish``. The node never relays output on the agent's hot path: the
child writes to its log file, and this reads what was appended, so a slow or
absent reader costs the agent nothing. A batch holds at most
``MAX_BATCH_LINES`` lines and ``MAX_BATCH_BYTES`` of line text; lines beyond
that are counted as dropped. The byte bound keeps a batch well under the
server's ``max_payload`` (1 MiB): a larger message cannot be published at
all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Literal

from schemas.common import utc_now
from schemas.logs import LogBatch, LogLine

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_LINES", "LogStreamer"]

Stream = Literal["stdout", "stderr"]
MAX_BATCH_LINES = 1000
MAX_BATCH_BYTES = 256 * 1024
_LINE_OVERHEAD = 64  # a line's JSON around its text: timestamp, stream, quotes
_MAX_LINE = 65536


class LogStreamer:
    """Follows one agent's two streams and hands out batches until it expires."""

    def __init__(
        self,
        agent_id: str,
        node_id: str,
        follow: Callable[[Stream], AsyncIterator[str]],
        emit: Callable[[LogBatch], None],
        *,
        flush_every: float = 0.2,
    ) -> None:
        self.agent_id = agent_id
        self._node_id = node_id
        self._follow = follow
        self._emit = emit
        self._flush_every = flush_every
        self._pending: list[LogLine] = []
        self._pending_bytes = 0
        self._dropped = 0
        self._seq = 0
        self.until: float = 0.0
        """Loop time after which the streamer stops (``inf`` while the spec asks for it)."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            readers = [tg.create_task(self._read(s)) for s in ("stdout", "stderr")]
            try:
                while loop.time() < self.until:
                    await asyncio.sleep(self._flush_every)
                    self._flush()
            finally:
                for reader in readers:
                    reader.cancel()
        self._flush()

    async def _read(self, stream: Stream) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async for line in self._follow(stream):
                line = line[:_MAX_LINE]
                size = len(line.encode("utf-8", "replace")) + _LINE_OVERHEAD
                if (
                    len(self._pending) >= MAX_BATCH_LINES
                    or self._pending_bytes + size > MAX_BATCH_BYTES
                ):
                    self._dropped += 1
                    continue
                self._pending.append(LogLine(utc_now(), stream, line))
                self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending and not self._dropped:
            return
        batch = LogBatch(
            agent_id=self.agent_id,
            node_id=self._node_id,
            seq=self._seq,
            lines=self._pending,
            dropped=self._dropped,
        )
        self._seq += 1
        self._pending, self._pending_bytes, self._dropped = [], 0, 0
        self._emit(batch)
