"""Decoding bytes from the network into typed messages, with limits.

Every decoder here raises exactly one exception type,
:class:`~schemas.errors.ContractError`, whatever the input: too large
(``payload_too_large``), not JSON or the wrong shape (``invalid_payload``), or
a command whose ``op`` is not known (``unknown_op``).
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

import msgspec

from schemas.command import AGENT_OPS, NODE_OPS, AgentCommand, CommandResult, NodeCommand
from schemas.errors import ContractError, ErrorCode, ErrorReply

__all__ = [
    "DEFAULT_MAX_BYTES",
    "decode",
    "decode_agent_command",
    "decode_node_command",
    "decode_reply",
    "encode",
]

T = TypeVar("T")

DEFAULT_MAX_BYTES = 1024 * 1024
"""The largest message any decoder accepts unless told otherwise (NATS' default max_payload)."""

_encoder = msgspec.json.Encoder()


class _OpPeek(msgspec.Struct):
    op: Any = None


@cache
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


def encode(message: object) -> bytes:
    return _encoder.encode(message)


def decode(
    data: bytes | bytearray | memoryview, type_: type[T], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> T:
    """Decode ``data`` as ``type_``; any failure is a :class:`ContractError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ContractError(ErrorCode.INVALID_PAYLOAD, "message body must be bytes")
    if len(data) > max_bytes:
        raise ContractError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"message is {len(data)} bytes, the limit is {max_bytes}"
        )
    try:
        return _decoder(type_).decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, "message nests too deeply") from None


def _decode_command(data: bytes, type_: Any, ops: frozenset[str], max_bytes: int) -> Any:
    try:
        return decode(data, type_, max_bytes=max_bytes)
    except ContractError as exc:
        if exc.code is not ErrorCode.INVALID_PAYLOAD:
            raise
        # The shape is wrong; tell an unknown operation apart from a bad argument.
        try:
            op = _decoder(_OpPeek).decode(data).op
        except (msgspec.DecodeError, RecursionError):
            raise exc from None
        if isinstance(op, str) and op not in ops:
            shown = op if len(op) <= 40 else op[:37] + "..."
            raise ContractError(
                ErrorCode.UNKNOWN_OP, f"unknown op {shown!r}; known: {', '.join(sorted(ops))}"
            ) from None
        raise


def decode_agent_command(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> AgentCommand:
    return _decode_command(data, AgentCommand, AGENT_OPS, max_bytes)  # type: ignore[no-any-return]


def decode_node_command(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> NodeCommand:
    return _decode_command(data, NodeCommand, NODE_OPS, max_bytes)  # type: ignore[no-any-return]


def decode_reply(
    data: bytes, *, max_bytes: int = 16 * DEFAULT_MAX_BYTES
) -> CommandResult | ErrorReply:
    return decode(data, CommandResult | ErrorReply, max_bytes=max_bytes)  # type: ignore[arg-type]
