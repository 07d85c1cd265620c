"""Errors that cross the wire, and the one exception the contract raises.

Every refusal the fabric sends back carries an :class:`ErrorCode`: a stable,
snake_case string that clients may branch on. The human text next to it may
change between releases; the code may not.

    ContractError            raised by every decoder and validator here
    ErrorReply               the wire shape of a refusal
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

__all__ = ["MAX_ERROR_MESSAGE", "ContractError", "ErrorCode", "ErrorReply"]

MAX_ERROR_MESSAGE = 2048
"""The longest human text an :class:`ErrorReply` carries."""


class ErrorCode(StrEnum):
    # The message itself is wrong.
    INVALID_PAYLOAD = "invalid_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_ID = "invalid_id"
    UNKNOWN_OP = "unknown_op"
    # The token does not allow it.
    TOKEN_MISSING = "token_missing"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_WRONG_AUDIENCE = "token_wrong_audience"
    TOKEN_SCOPE = "token_scope"
    TOKEN_WRONG_TARGET = "token_wrong_target"
    TOKEN_REPLAYED = "token_replayed"
    # The spec asks for more than the fabric or the node allows (fabric.spec_policy).
    SPEC_ENV_RESERVED = "spec_env_reserved"
    SPEC_CWD_FORBIDDEN = "spec_cwd_forbidden"
    SPEC_ROOT_FORBIDDEN = "spec_root_forbidden"
    # The request is well formed but cannot be done now.
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"
    INVALID_STATE = "invalid_state"
    STALE_EPOCH = "stale_epoch"
    NO_CAPACITY = "no_capacity"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ContractError(Exception):
    """A message or value that breaks the contract; carries a stable code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def to_reply(self) -> ErrorReply:
        # The wire caps the text; a long one (a decoder quoting a huge field)
        # is cut here rather than turned into a second, encoding error.
        message = self.message
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "…"
        return ErrorReply(code=self.code, message=message)


class ErrorReply(msgspec.Struct, forbid_unknown_fields=True, tag="error", tag_field="kind"):
    """The reply to any request that was refused."""

    code: ErrorCode
    message: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_MESSAGE)]
