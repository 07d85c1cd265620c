"""Batched stdout/stderr lines published on ``agents.<agent_id>.logs``."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.common import Timestamp
from schemas.ids import AgentId, NodeId

__all__ = ["LogBatch", "LogLine"]


class LogLine(msgspec.Struct, forbid_unknown_fields=True, frozen=True, array_like=False):
    at: Timestamp
    stream: Literal["stdout", "stderr"]
    line: Annotated[str, msgspec.Meta(max_length=65536)]


class LogBatch(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    agent_id: AgentId
    node_id: NodeId
    seq: Annotated[
        int, msgspec.Meta(ge=0, description="Batch counter; a gap means batches were lost.")
    ]
    lines: Annotated[list[LogLine], msgspec.Meta(max_length=10_000)]
    dropped: Annotated[
        int, msgspec.Meta(ge=0, description="Lines dropped since the previous batch.")
    ] = 0
