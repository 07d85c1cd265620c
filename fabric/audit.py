"""Audit of refusals: who tried what, written to the event stream, rate-limited.

A node agent or controller that refuses a command or API call (a bad token,
a malformed message) counts it and also tells the event stream, so an
operator can see abuse where the rest of the fleet's history is:
``events.node.refused`` from a node, ``events.controller.refused`` from a
controller. The event's data says::

    code        the ErrorCode of the refusal
    op          the command's op, or the API method ("register", "discover" ...)
    subject     the NATS subject the message came on
    claimed_by  the token's "sub", read WITHOUT checking the signature
    verified    whether claimed_by comes from a token that was verified
    target      the agent or node the message was about, if it named one
    suppressed  refusals not written since the previous event (rate limit)

``claimed_by`` is a claim, not a fact, unless ``verified`` is true: a forged
token names whoever its forger likes. Every string taken from the message is
cut short, so an event stays small whatever was sent.

Only refusals that say something about the caller are audited (token and
malformed-message codes); ordinary answers such as ``not_found`` or
``stale_epoch`` are counted by their services but not written here. A flood
of junk cannot flood the stream: :class:`RefusalAudit` lets through at most
``rate`` events per second (burst ``burst``) and counts the rest in
``suppressed``; the next event written carries how many were dropped.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.errors import ErrorCode

__all__ = [
    "AUDITED_CODES",
    "Refusal",
    "RefusalAudit",
    "peek_message",
    "unverified_subject",
]

AUDITED_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.TOKEN_MISSING,
        ErrorCode.TOKEN_INVALID,
        ErrorCode.TOKEN_EXPIRED,
        ErrorCode.TOKEN_NOT_YET_VALID,
        ErrorCode.TOKEN_WRONG_AUDIENCE,
        ErrorCode.TOKEN_SCOPE,
        ErrorCode.TOKEN_WRONG_TARGET,
        ErrorCode.TOKEN_REPLAYED,
        ErrorCode.INVALID_PAYLOAD,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.INVALID_ID,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.SPEC_ENV_RESERVED,
        ErrorCode.SPEC_CWD_FORBIDDEN,
        ErrorCode.SPEC_ROOT_FORBIDDEN,
    }
)
"""Refusals worth an event: the caller's token or message is wrong, or its
spec asks for what the fabric forbids (fabric.spec_policy)."""

_MAX_TEXT = 128
_MAX_TOKEN = 8192
_MAX_PEEK = 1024 * 1024


def _short(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= _MAX_TEXT else value[: _MAX_TEXT - 3] + "..."


class _Claimed(msgspec.Struct):
    sub: Any = None


class _Named(msgspec.Struct):
    name: Any = None


class _Deployment(msgspec.Struct):
    spec: _Named | None = None


class _Peek(msgspec.Struct):
    op: Any = None
    token: Any = None
    agent_id: Any = None
    node_id: Any = None
    name: Any = None
    # Raw: the nested shapes are read only if the top level decodes at all.
    spec: msgspec.Raw = msgspec.Raw(b"null")
    deployment: msgspec.Raw = msgspec.Raw(b"null")


_claimed_decoder = msgspec.json.Decoder(_Claimed)
_peek_decoder = msgspec.json.Decoder(_Peek)
_named_decoder = msgspec.json.Decoder(_Named)
_deployment_decoder = msgspec.json.Decoder(_Deployment)
_PEEK_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeError, ValueError, TypeError)


def unverified_subject(token: object) -> str | None:
    """The ``sub`` claim of a compact JWS, read without checking anything; None if unreadable."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return _short(_claimed_decoder.decode(raw).sub)
    except (*_PEEK_ERRORS, binascii.Error):
        return None


@dataclass(frozen=True, slots=True)
class _Peeked:
    op: str | None = None
    token: str | None = None
    target: str | None = None


def peek_message(data: bytes) -> _Peeked:
    """Best-effort look at a refused message: its op, token and target, never raising."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > _MAX_PEEK:
        return _Peeked()
    try:
        peek = _peek_decoder.decode(data)
    except _PEEK_ERRORS:
        return _Peeked()
    target: object = peek.agent_id or peek.node_id or peek.name
    for raw, decoder in ((peek.spec, _named_decoder), (peek.deployment, _deployment_decoder)):
        if target is None and bytes(raw) != b"null":
            try:
                inner = decoder.decode(raw)
            except _PEEK_ERRORS:
                continue
            target = inner.name if isinstance(inner, _Named) else (inner.spec and inner.spec.name)
    token = peek.token if isinstance(peek.token, str) else None
    return _Peeked(op=_short(peek.op), token=token, target=_short(target))


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused message: what is known for sure, plus the message to read on demand.

    The message is only looked into (:meth:`data`) when the refusal is actually
    written, so a flood that the rate limit suppresses costs no parsing.
    """

    code: ErrorCode
    subject: str
    body: bytes = b""
    op: str | None = None
    """The op or API method when the receiver knows it; else read from ``body``."""
    target: str | None = None
    """The agent or node the subject names; else read from ``body``."""
    verified_by: str | None = None
    """The subject of a token that passed verification before the refusal, if any."""

    @classmethod
    def of(
        cls,
        code: ErrorCode,
        subject: str,
        data: bytes,
        *,
        op: str | None = None,
        target: str | None = None,
        verified_by: str | None = None,
    ) -> Refusal:
        """A refusal of ``data`` received on ``subject`` (see the fields)."""
        return cls(code, subject, bytes(data), op, target, verified_by)

    def data(self, suppressed: int = 0) -> dict[str, object]:
        """The event's data; the claimed subject is read without trust unless verified."""
        peek = peek_message(self.body)
        verified = self.verified_by is not None
        claimed = _short(self.verified_by) if verified else unverified_subject(peek.token)
        return {
            "code": self.code.value,
            "op": _short(self.op) or peek.op,
            "subject": _short(self.subject) or "",
            "claimed_by": claimed,
            "verified": verified,
            "target": _short(self.target) or peek.target,
            "suppressed": suppressed,
        }

    @property
    def actor(self) -> str | None:
        """The event's actor: only a verified token names one."""
        return _short(self.verified_by)


class RefusalAudit:
    """Writes refusals through ``emit`` at most ``rate`` per second (token bucket).

    ``emit(data, actor)`` publishes one event; it is called synchronously and
    must not block. Refusals over the rate are counted in :attr:`suppressed`
    and the count rides on the next event that goes out.
    """

    def __init__(
        self,
        emit: Callable[[dict[str, object], str | None], None],
        *,
        rate: float = 10.0,
        burst: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate > 0 and burst >= 1 needed")
        self._emit = emit
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._pending_suppressed = 0
        self.emitted = 0
        self.suppressed = 0

    def __call__(self, refusal: Refusal) -> bool:
        """Audit ``refusal``; True if an event was written, False if skipped or suppressed."""
        if refusal.code not in AUDITED_CODES:
            return False
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            self._pending_suppressed += 1
            return False
        self._tokens -= 1
        data = refusal.data(self._pending_suppressed)
        self._pending_suppressed = 0
        self.emitted += 1
        self._emit(data, refusal.actor)
        return True
