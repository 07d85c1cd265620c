"""Short-lived operator tokens: EdDSA (Ed25519) JWTs.

mTLS says which machine may speak on which subject; a token says which person
may do this, to which agent or node, until when. A token is minted by
:class:`TokenIssuer` with the PKI's ``signing.key`` and checked by
:class:`TokenVerifier` with ``signing.pub``. The verifier knows nothing of
NATS: node agents and controllers call it from their handlers.

Refusals are :class:`~schemas.errors.ContractError` with one code each, checked
in this order, so a token that is wrong in two ways always gets the same code::

    TOKEN_MISSING         no token at all
    TOKEN_INVALID         malformed, bad signature, not EdDSA, lifetime too long
    TOKEN_EXPIRED         past exp (+ leeway)
    TOKEN_NOT_YET_VALID   before nbf or iat (- leeway)
    TOKEN_WRONG_AUDIENCE  aud is not this fabric
    TOKEN_SCOPE           the scope the call needs is not granted
    TOKEN_WRONG_TARGET    bound to another agent or node than the call's
    TOKEN_REPLAYED        this jti was already accepted

Only a token that passed every other check is recorded against replay, so a
refused token cannot burn a valid one's id.

``max_tasks`` (absent: 1) is how many distinct task ids one submit token may
admit; only task admission (:mod:`fabric.tasks.admission`) reads it. A
request still spends its token on one call, whatever the claim says.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Self

import jwt
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fabric.pki import PkiError, write_file_atomic
from schemas.errors import ContractError, ErrorCode
from schemas.ids import ID_PATTERN

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_REPLAY_CACHE_SIZE",
    "MAX_TASKS_PER_TOKEN",
    "SCOPES",
    "SIGNING_KEY",
    "SIGNING_PUB",
    "Claims",
    "TokenIssuer",
    "TokenVerifier",
    "write_signing_keypair",
]

SCOPES: tuple[str, ...] = (
    "agents:run",
    "agents:stop",
    "agents:signal",
    "nodes:admin",
    "tasks:submit",
    "read",
)
DEFAULT_AUDIENCE = "agent-fabric"
DEFAULT_LEEWAY = 5.0
DEFAULT_MAX_LIFETIME = 3600.0
DEFAULT_REPLAY_CACHE_SIZE = 100_000
MAX_TASKS_PER_TOKEN = 10_000
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"

_ALGORITHM = "EdDSA"
# Far above any token we mint (a few hundred bytes); stops a huge string from
# reaching base64 and JSON decoding at all.
_MAX_TOKEN_LENGTH = 8192
_ID_RE = re.compile(ID_PATTERN)

_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Jti = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Time = Annotated[int, msgspec.Meta(ge=0)]
_MaxTasks = Annotated[int, msgspec.Meta(ge=1, le=MAX_TASKS_PER_TOKEN)]


# omit_defaults: a token minted without max_tasks (or absent agent/node) carries
# no such key, so a verifier that predates the claim still reads it.
class Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a verified token says: who asks, for what, until when, for how many tasks."""

    sub: _Text
    iss: _Text
    aud: _Text
    iat: _Time
    nbf: _Time
    exp: _Time
    jti: _Jti
    scopes: Annotated[list[str], msgspec.Meta(max_length=len(SCOPES))]
    agent: str | None = None
    node: str | None = None
    max_tasks: _MaxTasks = 1


_claims_decoder = msgspec.json.Decoder(Claims)


def _key_id(public_key: Ed25519PublicKey) -> str:
    # Lets a verifier holding several keys (rotation) try the right one first.
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_signing_keypair(pki_dir: Path, *, force: bool = False) -> None:
    """Write a fresh Ed25519 pair: ``signing.key`` (PKCS8, 0600) and ``signing.pub`` (0644)."""
    key_path, pub_path = pki_dir / SIGNING_KEY, pki_dir / SIGNING_PUB
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise PkiError(f"{path} already exists: use --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(key_path, private_pem, mode=0o600, force=force)
    write_file_atomic(pub_path, public_pem, mode=0o644, force=force)


def _first_line(exc: Exception) -> str:
    # cryptography's load errors run over several lines; callers print one.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_target(value: str | None, what: str) -> None:
    if value is not None and _ID_RE.fullmatch(value) is None:
        raise ValueError(f"bad {what} id {value!r}")


class TokenIssuer:
    """Mints tokens with one Ed25519 private key."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        issuer: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer or len(issuer) > 256:
            raise ValueError("issuer must be 1 to 256 characters")
        self._key = private_key
        self._issuer = issuer
        self._clock = clock
        self._kid = _key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path, issuer: str, *, clock: Callable[[], float] = time.time) -> Self:
        """Load a PEM PKCS8 Ed25519 key; ValueError (one line, naming the file) if the file
        holds anything else, OSError if it cannot be read."""
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{path}: {_first_line(exc)}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key, issuer, clock=clock)

    def mint(
        self,
        subject: str,
        scopes: Sequence[str],
        *,
        agent: str | None = None,
        node: str | None = None,
        ttl: float = 60,
        audience: str = DEFAULT_AUDIENCE,
        not_before: float | None = None,
        max_tasks: int | None = None,
    ) -> str:
        """A signed token for ``subject``, valid from ``not_before`` (default now) for ``ttl``
        seconds. Binding ``agent`` or ``node`` limits it to that target; without them it
        is fleet-wide. ``max_tasks`` (1 to :data:`MAX_TASKS_PER_TOKEN`; None: 1) lets one
        submit token admit that many distinct tasks."""
        if isinstance(scopes, str):
            raise ValueError("scopes must be a sequence of scope names, not one string")
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise ValueError(f"unknown scope {unknown[0]!r}: choose from {', '.join(SCOPES)}")
        if not scopes:
            raise ValueError("a token needs at least one scope")
        if not subject or len(subject) > 256:
            raise ValueError("subject must be 1 to 256 characters")
        if not audience or len(audience) > 256:
            raise ValueError("audience must be 1 to 256 characters")
        # Below one second the integer exp could equal iat: a token dead on arrival.
        if not (math.isfinite(ttl) and ttl >= 1):
            raise ValueError(f"ttl must be at least 1 second, not {ttl!r}")
        if not_before is not None and not (math.isfinite(not_before) and not_before >= 0):
            raise ValueError(f"not_before must be a unix time, not {not_before!r}")
        if max_tasks is not None and (
            isinstance(max_tasks, bool)
            or not isinstance(max_tasks, int)
            or not 1 <= max_tasks <= MAX_TASKS_PER_TOKEN
        ):
            raise ValueError(
                f"max_tasks must be an integer from 1 to {MAX_TASKS_PER_TOKEN}, not {max_tasks!r}"
            )
        _check_target(agent, "agent")
        _check_target(node, "node")
        now = self._clock()
        start = now if not_before is None else not_before
        claims = Claims(
            sub=subject,
            iss=self._issuer,
            aud=audience,
            iat=int(now),
            nbf=int(start),
            exp=int(start + ttl),
            jti=secrets.token_hex(16),
            scopes=list(dict.fromkeys(scopes)),
            agent=agent,
            node=node,
            max_tasks=1 if max_tasks is None else max_tasks,
        )
        payload = msgspec.json.encode(claims)
        return jwt.PyJWS().encode(
            payload, self._key, algorithm=_ALGORITHM, headers={"kid": self._kid}
        )


class _ReplayCache:
    """The jtis accepted and still alive, bounded in time and in count."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._expiry: dict[str, float] = {}
        # Min-heap by expiry, so dropping dead entries costs only what is dropped.
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, jti = heapq.heappop(self._heap)
            self._expiry.pop(jti, None)

    def seen(self, jti: str) -> bool:
        return jti in self._expiry

    def full(self) -> bool:
        return len(self._expiry) >= self._capacity

    def add(self, jti: str, until: float) -> None:
        self._expiry[jti] = until
        heapq.heappush(self._heap, (until, jti))


class TokenVerifier:
    """Checks tokens against one or more Ed25519 public keys and remembers accepted ids."""

    def __init__(
        self,
        public_keys: Sequence[Ed25519PublicKey],
        *,
        audience: str = DEFAULT_AUDIENCE,
        leeway: float = DEFAULT_LEEWAY,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        replay_cache_size: int = DEFAULT_REPLAY_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not public_keys:
            raise ValueError("a verifier needs at least one public key")
        if leeway < 0 or max_lifetime <= 0 or replay_cache_size < 1:
            raise ValueError("leeway >= 0, max_lifetime > 0 and replay_cache_size >= 1 needed")
        self._keys = {_key_id(k): k for k in public_keys}
        self._audience = audience
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._clock = clock
        self._replay = _ReplayCache(replay_cache_size)
        # Handlers may run in threads (executors); the replay check and record
        # must be one step or two copies of a token could both pass.
        self._lock = threading.Lock()
        self._jws = jwt.PyJWS(algorithms=[_ALGORITHM])

    @classmethod
    def from_files(
        cls,
        *paths: Path,
        audience: str = DEFAULT_AUDIENCE,
        leeway: float = DEFAULT_LEEWAY,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        replay_cache_size: int = DEFAULT_REPLAY_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Load PEM SubjectPublicKeyInfo Ed25519 keys; ValueError for anything else."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            data = Path(path).read_bytes()
            try:
                key = serialization.load_pem_public_key(data)
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ValueError(f"{path}: {_first_line(exc)}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{path}: not an Ed25519 public key")
            keys.append(key)
        return cls(
            keys,
            audience=audience,
            leeway=leeway,
            max_lifetime=max_lifetime,
            replay_cache_size=replay_cache_size,
            clock=clock,
        )

    @property
    def replay_cache_len(self) -> int:
        return len(self._replay)

    def verify(
        self,
        token: str | None,
        *,
        scope: str,
        agent: str | None = None,
        node: str | None = None,
    ) -> Claims:
        """Return the claims of ``token`` if it allows ``scope`` on this target, else raise
        ContractError. ``agent``/``node`` name the call's target; None means the call
        is not about one agent (or node), which only an unbound token may do."""
        if scope not in SCOPES:
            # The caller's bug, not the token's: fail loudly rather than refuse.
            raise ValueError(f"unknown scope {scope!r}")
        if not token:
            raise ContractError(ErrorCode.TOKEN_MISSING, "a token is required")
        claims = self.decode(token)
        now = self._clock()
        self.check(claims, now, scope=scope, agent=agent, node=node)
        self._record(claims, now)
        return claims

    def check(
        self,
        claims: Claims,
        now: float,
        *,
        scope: str,
        agent: str | None = None,
        node: str | None = None,
    ) -> None:
        """The checks of :meth:`verify` that depend on the moment and the call, on claims
        :meth:`decode` returned: time as of ``now`` (with the leeway), audience, scope,
        target. Replay is the caller's to check."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        self._check_time(claims, now)
        if claims.aud != self._audience:
            raise ContractError(
                ErrorCode.TOKEN_WRONG_AUDIENCE,
                f"token is for {claims.aud!r}, not {self._audience!r}",
            )
        if scope not in claims.scopes:
            raise ContractError(ErrorCode.TOKEN_SCOPE, f"token does not grant {scope!r}")
        if claims.agent is not None and claims.agent != agent:
            raise ContractError(
                ErrorCode.TOKEN_WRONG_TARGET, f"token is bound to agent {claims.agent!r}"
            )
        if claims.node is not None and claims.node != node:
            raise ContractError(
                ErrorCode.TOKEN_WRONG_TARGET, f"token is bound to node {claims.node!r}"
            )

    def decode(self, token: str) -> Claims:
        """The claims of ``token`` once its signature and form are checked (TOKEN_INVALID
        otherwise): what holds whenever it is shown. Nothing is checked against a
        clock, a call or the replay cache; :meth:`check` does that."""
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
            raise ContractError(ErrorCode.TOKEN_INVALID, "token is not a compact JWS of sane size")
        try:
            header = self._jws.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, UnicodeError):
            raise ContractError(ErrorCode.TOKEN_INVALID, "token is malformed") from None
        # Pinned, never taken from the token: "none" and HS256 forgeries stop here.
        if header.get("alg") != _ALGORITHM:
            raise ContractError(ErrorCode.TOKEN_INVALID, "token is not signed with EdDSA")
        kid = header.get("kid")
        keys = list(self._keys.values())
        if isinstance(kid, str) and kid in self._keys:
            keys = [self._keys[kid]]
        payload: bytes | None = None
        for key in keys:
            try:
                payload = self._jws.decode_complete(token, key, algorithms=[_ALGORITHM])["payload"]
                break
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError, UnicodeError):
                raise ContractError(ErrorCode.TOKEN_INVALID, "token is malformed") from None
        if payload is None:
            raise ContractError(ErrorCode.TOKEN_INVALID, "token signature does not verify")
        try:
            claims = _claims_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise ContractError(
                ErrorCode.TOKEN_INVALID, f"token claims are invalid: {exc}"
            ) from None
        for value in (claims.agent, claims.node):
            if value is not None and _ID_RE.fullmatch(value) is None:
                raise ContractError(
                    ErrorCode.TOKEN_INVALID, "token names a target that is not an id"
                )
        if claims.exp < claims.nbf:
            raise ContractError(ErrorCode.TOKEN_INVALID, "token expires before it becomes valid")
        if claims.exp - claims.iat > self._max_lifetime:
            raise ContractError(
                ErrorCode.TOKEN_INVALID,
                f"token lifetime exceeds the {self._max_lifetime:g} s maximum",
            )
        return claims

    def _check_time(self, claims: Claims, now: float) -> None:
        if now >= claims.exp + self._leeway:
            raise ContractError(ErrorCode.TOKEN_EXPIRED, "token has expired")
        # A token issued "in the future" means the issuer's clock is ahead: not
        # valid yet here, whatever nbf says.
        if now + self._leeway < max(claims.nbf, claims.iat):
            raise ContractError(ErrorCode.TOKEN_NOT_YET_VALID, "token is not valid yet")

    def _record(self, claims: Claims, now: float) -> None:
        with self._lock:
            self._replay.purge(now)
            if self._replay.seen(claims.jti):
                raise ContractError(ErrorCode.TOKEN_REPLAYED, "token was already used")
            if self._replay.full():
                raise ContractError(
                    ErrorCode.TOKEN_INVALID, "replay cache full: refusing until tokens expire"
                )
            # Kept while the token could still pass the expiry check.
            self._replay.add(claims.jti, claims.exp + self._leeway)
