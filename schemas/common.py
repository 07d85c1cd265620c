"""Constrained field types shared by every message.

Times on the wire are RFC 3339 strings with a UTC offset (the same form the
CloudEvents ``time`` attribute uses), everywhere. Durations are seconds as
numbers. Every string, list and map has an upper bound.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec

__all__ = [
    "Labels",
    "Seconds",
    "ShortText",
    "Text",
    "Timestamp",
    "utc_now",
]

Timestamp = Annotated[
    datetime,
    msgspec.Meta(tz=True, description="RFC 3339 date-time with a UTC offset."),
]
Seconds = Annotated[
    float, msgspec.Meta(ge=0, le=7 * 24 * 3600, description="A duration in seconds (0 to 7 days).")
]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]

LabelKey = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_./-]{0,62}(?!\n)$")]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Labels = Annotated[
    dict[LabelKey, LabelValue],
    msgspec.Meta(max_length=64, description="Free-form key/value labels (at most 64)."),
]


def utc_now() -> datetime:
    return datetime.now(UTC)
