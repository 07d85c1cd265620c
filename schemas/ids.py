"""Identifiers: the only strings that may become part of a subject or a path.

Agent ids, node ids, task types and identity names all follow one rule,
``[a-z0-9][a-z0-9_-]{0,62}``: lowercase, no dots, no wildcards, no spaces, so
an id can never add a subject token, match a wildcard or climb a directory.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from schemas.errors import ContractError, ErrorCode

__all__ = [
    "ID_PATTERN",
    "AgentId",
    "EventKind",
    "NodeId",
    "TaskId",
    "TaskType",
    "is_valid_id",
    "validate_id",
]

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}(?!\n)$"
_ID_RE = re.compile(ID_PATTERN)
# An event kind is two or three id-shaped tokens joined by dots, e.g. "agent.exited".
EVENT_KIND_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}(\.[a-z0-9][a-z0-9_-]{0,62}){1,2}(?!\n)$"

_ID_DOC = (
    "lowercase letters, digits, '_' and '-', 1 to 63 characters, starting with a letter or digit"
)

AgentId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description=f"Agent id: {_ID_DOC}.")]
NodeId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description=f"Node id: {_ID_DOC}.")]
TaskType = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description=f"Task type: {_ID_DOC}.")]
TaskId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description=f"Task id: {_ID_DOC}.")]
EventKind = Annotated[
    str,
    msgspec.Meta(
        pattern=EVENT_KIND_PATTERN,
        description="Event kind, e.g. 'agent.exited': two or three id-shaped tokens joined by '.'.",
    ),
]


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` when it is a valid id, else raise ``ContractError(INVALID_ID)``."""
    if not is_valid_id(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ContractError(ErrorCode.INVALID_ID, f"invalid {what} {shown}: must be {_ID_DOC}")
    assert isinstance(value, str)
    return value
