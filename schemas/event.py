"""The CloudEvents 1.0 envelope (JSON format) every ``events.<kind>`` message uses.

``type`` is ``io.agent-fabric.<kind>`` (e.g. ``io.agent-fabric.agent.exited``),
``source`` the publisher's identity (``/nodes/<node_id>`` or
``/controllers/<name>``), ``subject`` the agent or node id the event is about,
and ``actor`` (an extension attribute) who caused it, from the command token.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import msgspec

from schemas.common import ShortText, Timestamp, utc_now
from schemas.ids import EVENT_KIND_PATTERN

__all__ = ["EVENT_TYPE_PREFIX", "CloudEvent", "make_event"]

_KIND_RE = re.compile(EVENT_KIND_PATTERN)

EVENT_TYPE_PREFIX = "io.agent-fabric."


class CloudEvent(
    msgspec.Struct, forbid_unknown_fields=False, frozen=True, kw_only=True, omit_defaults=True
):
    """A CloudEvents 1.0 structured-mode JSON event.

    Unknown attributes are accepted: CloudEvents allows extensions. Optional
    attributes that are unset are left out, as the spec asks.
    """

    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: Annotated[str, msgspec.Meta(pattern=r"^io\.agent-fabric\.", max_length=256)]
    subject: ShortText | None = None
    time: Timestamp
    datacontenttype: Literal["application/json"]
    actor: ShortText | None = None
    data: Any = None

    @property
    def kind(self) -> str:
        return self.type.removeprefix(EVENT_TYPE_PREFIX)


def make_event(
    kind: str,
    *,
    source: str,
    subject: str | None = None,
    data: Any = None,
    actor: str | None = None,
    event_id: str | None = None,
) -> CloudEvent:
    """Build an event for ``events.<kind>``; ``kind`` must be a valid event kind.

    ``event_id``: a fixed id (one that doubles as ``Nats-Msg-Id``), else a new one."""
    if _KIND_RE.fullmatch(kind) is None:
        raise ValueError(f"invalid event kind {kind!r}")
    return CloudEvent(
        specversion="1.0",
        datacontenttype="application/json",
        id=event_id or uuid.uuid4().hex,
        source=source,
        type=EVENT_TYPE_PREFIX + kind,
        subject=subject,
        time=utc_now(),
        actor=actor,
        data=data,
    )
