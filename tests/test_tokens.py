"""fabric.tokens: every refusal has its own code; time comes from an injected clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import tokens
from fabric.pki import PkiError
from fabric.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_LEEWAY,
    SCOPES,
    TokenIssuer,
    TokenVerifier,
    write_signing_keypair,
)
from schemas.errors import ContractError, ErrorCode

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    write_signing_keypair(tmp_path)
    return tmp_path


@pytest.fixture
def issuer(keydir: Path, clock: Clock) -> TokenIssuer:
    return TokenIssuer.from_file(keydir / "signing.key", "test-cli", clock=clock)


@pytest.fixture
def verifier(keydir: Path, clock: Clock) -> TokenVerifier:
    return TokenVerifier.from_files(keydir / "signing.pub", clock=clock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], claims: dict[str, object], secret: bytes) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _claims_of(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def _refusal(verifier: TokenVerifier, token: str | None, **kwargs: str | None) -> ErrorCode:
    kwargs.setdefault("scope", "read")
    with pytest.raises(ContractError) as info:
        verifier.verify(token, **kwargs)  # type: ignore[arg-type]
    return info.value.code


def test_public_names() -> None:
    assert set(tokens.__all__) >= {
        "SCOPES",
        "DEFAULT_AUDIENCE",
        "DEFAULT_LEEWAY",
        "Claims",
        "TokenIssuer",
        "TokenVerifier",
        "write_signing_keypair",
    }
    assert SCOPES == (
        "agents:run",
        "agents:stop",
        "agents:signal",
        "nodes:admin",
        "tasks:submit",
        "read",
    )
    assert (DEFAULT_AUDIENCE, DEFAULT_LEEWAY) == ("agent-fabric", 5.0)


def test_signing_keypair_files(keydir: Path) -> None:
    assert stat.S_IMODE((keydir / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keydir / "signing.pub").stat().st_mode) == 0o644
    assert (keydir / "signing.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (keydir / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_signing_keypair_no_overwrite(keydir: Path) -> None:
    old = (keydir / "signing.key").read_bytes()

    with pytest.raises(PkiError, match=r"signing\.key already exists: use --force"):
        write_signing_keypair(keydir)

    assert (keydir / "signing.key").read_bytes() == old
    write_signing_keypair(keydir, force=True)
    assert (keydir / "signing.key").read_bytes() != old


def test_valid_token(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("alice", ["agents:run", "read"], agent="web-1", node="n1", ttl=60)

    claims = verifier.verify(token, scope="agents:run", agent="web-1", node="n1")

    assert (claims.sub, claims.iss, claims.aud) == ("alice", "test-cli", "agent-fabric")
    assert (claims.iat, claims.nbf, claims.exp) == (int(T0), int(T0), int(T0) + 60)
    assert claims.scopes == ["agents:run", "read"]
    assert (claims.agent, claims.node) == ("web-1", "n1")
    assert len(claims.jti) == 32
    int(claims.jti, 16)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"


def test_unbound_token_is_fleet_wide(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    for target in ("a1", "a2", None):
        token = issuer.mint("alice", ["agents:stop"])
        assert verifier.verify(token, scope="agents:stop", agent=target).agent is None


@pytest.mark.parametrize("token", [None, ""])
def test_missing(verifier: TokenVerifier, token: str | None) -> None:
    assert _refusal(verifier, token) is ErrorCode.TOKEN_MISSING


def test_expired_and_leeway(issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    token = issuer.mint("alice", ["read"], ttl=60)
    late = issuer.mint("alice", ["read"], ttl=60)
    clock.now = T0 + 60 + DEFAULT_LEEWAY - 0.5
    verifier.verify(late, scope="read")
    clock.now = T0 + 60 + DEFAULT_LEEWAY

    assert _refusal(verifier, token) is ErrorCode.TOKEN_EXPIRED


def test_not_yet_valid_and_leeway(
    issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock
) -> None:
    early = issuer.mint("alice", ["read"], not_before=T0 + 100)
    slightly = issuer.mint("alice", ["read"], not_before=T0 + DEFAULT_LEEWAY)

    assert _refusal(verifier, early) is ErrorCode.TOKEN_NOT_YET_VALID
    verifier.verify(slightly, scope="read")
    clock.now = T0 + 100
    verifier.verify(early, scope="read")


def test_issued_in_the_future(keydir: Path, verifier: TokenVerifier) -> None:
    ahead = TokenIssuer.from_file(keydir / "signing.key", "skewed", clock=lambda: T0 + 600)

    assert _refusal(verifier, ahead.mint("alice", ["read"])) is ErrorCode.TOKEN_NOT_YET_VALID


def test_wrong_signature(clock: Clock, verifier: TokenVerifier) -> None:
    stranger = TokenIssuer(Ed25519PrivateKey.generate(), "evil", clock=clock)

    assert _refusal(verifier, stranger.mint("mallory", ["read"])) is ErrorCode.TOKEN_INVALID


def test_tampered_claims(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    header, _, signature = issuer.mint("alice", ["read"]).split(".")
    claims = _claims_of(issuer.mint("alice", ["read"]))
    claims["scopes"] = list(SCOPES)
    forged = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"

    assert _refusal(verifier, forged, scope="nodes:admin") is ErrorCode.TOKEN_INVALID


def test_alg_none(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    claims = _claims_of(issuer.mint("alice", ["read"]))
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    forged = f"{header}.{_b64(json.dumps(claims).encode())}."

    assert _refusal(verifier, forged) is ErrorCode.TOKEN_INVALID


def test_hs256_with_the_public_key_as_secret(
    keydir: Path, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    claims = _claims_of(issuer.mint("alice", ["read"]))
    forged = _forge({"alg": "HS256", "typ": "JWT"}, claims, (keydir / "signing.pub").read_bytes())

    assert _refusal(verifier, forged) is ErrorCode.TOKEN_INVALID


def test_alg_header_says_eddsa_but_mac_signature(
    keydir: Path, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    claims = _claims_of(issuer.mint("alice", ["read"]))
    forged = _forge({"alg": "EdDSA"}, claims, (keydir / "signing.pub").read_bytes())

    assert _refusal(verifier, forged) is ErrorCode.TOKEN_INVALID


@pytest.mark.parametrize(
    "token",
    ["x", "a.b.c", "...", "a.b", "e30.e30.", "Bearer abc", "ü.ü.ü", "e" * 10_000, "\x00"],
)
def test_malformed(verifier: TokenVerifier, token: str) -> None:
    assert _refusal(verifier, token) is ErrorCode.TOKEN_INVALID


def test_wrong_audience(keydir: Path, issuer: TokenIssuer, clock: Clock) -> None:
    other = TokenVerifier.from_files(keydir / "signing.pub", audience="other-fabric", clock=clock)

    assert _refusal(other, issuer.mint("alice", ["read"])) is ErrorCode.TOKEN_WRONG_AUDIENCE


def test_missing_scope(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("alice", ["read", "agents:run"])

    assert _refusal(verifier, token, scope="agents:stop") is ErrorCode.TOKEN_SCOPE


@pytest.mark.parametrize(
    ("bound", "target"),
    [
        ({"agent": "a1"}, {"agent": "a2"}),
        ({"agent": "a1"}, {}),
        ({"node": "n1"}, {"node": "n2"}),
        ({"node": "n1"}, {"agent": "a1"}),
        ({"agent": "a1", "node": "n1"}, {"agent": "a1", "node": "n2"}),
    ],
)
def test_wrong_target(
    issuer: TokenIssuer, verifier: TokenVerifier, bound: dict[str, str], target: dict[str, str]
) -> None:
    token = issuer.mint("alice", ["agents:signal"], **bound)  # type: ignore[arg-type]

    assert _refusal(verifier, token, scope="agents:signal", **target) is (
        ErrorCode.TOKEN_WRONG_TARGET
    )


def test_replayed(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("alice", ["read"])
    verifier.verify(token, scope="read")

    assert _refusal(verifier, token) is ErrorCode.TOKEN_REPLAYED


def test_refused_token_is_not_recorded(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("alice", ["read"], agent="a1")
    assert _refusal(verifier, token, agent="a2") is ErrorCode.TOKEN_WRONG_TARGET

    verifier.verify(token, scope="read", agent="a1")

    assert verifier.replay_cache_len == 1


def test_checks_run_in_order(issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock) -> None:
    wrong_scope_and_target = issuer.mint("alice", ["read"], agent="a1")
    assert _refusal(verifier, wrong_scope_and_target, scope="nodes:admin", agent="a2") is (
        ErrorCode.TOKEN_SCOPE
    )
    expired_and_wrong_audience = issuer.mint("alice", ["read"], audience="elsewhere")
    clock.now += 3600

    assert _refusal(verifier, expired_and_wrong_audience) is ErrorCode.TOKEN_EXPIRED


def test_replay_cache_drops_expired_entries(
    issuer: TokenIssuer, verifier: TokenVerifier, clock: Clock
) -> None:
    for _ in range(3):
        verifier.verify(issuer.mint("alice", ["read"], ttl=10), scope="read")
    assert verifier.replay_cache_len == 3
    clock.now = T0 + 10 + DEFAULT_LEEWAY

    verifier.verify(issuer.mint("alice", ["read"], ttl=10), scope="read")

    assert verifier.replay_cache_len == 1


def test_replay_cache_full(keydir: Path, issuer: TokenIssuer, clock: Clock) -> None:
    verifier = TokenVerifier.from_files(keydir / "signing.pub", replay_cache_size=2, clock=clock)
    verifier.verify(issuer.mint("alice", ["read"], ttl=10), scope="read")
    verifier.verify(issuer.mint("alice", ["read"], ttl=10), scope="read")
    third = issuer.mint("alice", ["read"], ttl=60)

    with pytest.raises(ContractError, match="replay cache full") as info:
        verifier.verify(third, scope="read")

    assert info.value.code is ErrorCode.TOKEN_INVALID
    clock.now = T0 + 10 + DEFAULT_LEEWAY
    verifier.verify(third, scope="read")
    assert verifier.replay_cache_len == 1


def test_lifetime_cap(keydir: Path, issuer: TokenIssuer, clock: Clock) -> None:
    strict = TokenVerifier.from_files(keydir / "signing.pub", clock=clock)
    lenient = TokenVerifier.from_files(keydir / "signing.pub", max_lifetime=7200, clock=clock)
    long_lived = issuer.mint("alice", ["read"], ttl=3601)

    assert _refusal(strict, long_lived) is ErrorCode.TOKEN_INVALID
    lenient.verify(long_lived, scope="read")
    strict.verify(issuer.mint("alice", ["read"], ttl=3600), scope="read")


def test_key_rotation(keydir: Path, issuer: TokenIssuer, clock: Clock, tmp_path: Path) -> None:
    newdir = tmp_path / "new"
    write_signing_keypair(newdir)
    new_issuer = TokenIssuer.from_file(newdir / "signing.key", "test-cli", clock=clock)
    both = TokenVerifier.from_files(keydir / "signing.pub", newdir / "signing.pub", clock=clock)

    both.verify(issuer.mint("alice", ["read"]), scope="read")
    both.verify(new_issuer.mint("alice", ["read"]), scope="read")


@pytest.mark.parametrize(
    ("scopes", "kwargs"),
    [
        (["root"], {}),
        ([], {}),
        ("read", {}),
        (["read"], {"ttl": 0.5}),
        (["read"], {"ttl": float("nan")}),
        (["read"], {"ttl": float("inf")}),
        (["read"], {"agent": "Bad.Agent"}),
        (["read"], {"node": ""}),
    ],
)
def test_mint_refuses_bad_arguments(
    issuer: TokenIssuer, scopes: list[str], kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        issuer.mint("alice", scopes, **kwargs)  # type: ignore[arg-type]


def test_verify_refuses_unknown_scope_name(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        verifier.verify(issuer.mint("alice", ["read"]), scope="admin")


def test_loaders_refuse_wrong_key_types(tmp_path: Path) -> None:
    from fabric.pki import init_pki

    init_pki(tmp_path / "pki")

    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        TokenIssuer.from_file(tmp_path / "pki" / "ca.key", "x")
    with pytest.raises(ValueError, match=r"ca\.crt"):
        TokenVerifier.from_files(tmp_path / "pki" / "ca.crt")


_JWS_SHAPED = r"\A[A-Za-z0-9_=-]{0,40}(\.[A-Za-z0-9_=-]{0,40}){2}\Z"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(_JWS_SHAPED))
def test_random_text_only_contract_errors(text: str) -> None:
    verifier = TokenVerifier([Ed25519PrivateKey.generate().public_key()], clock=lambda: T0)

    with pytest.raises(ContractError):
        verifier.verify(text, scope="read")


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )
)
def test_signed_garbage_claims_only_contract_errors(payload: object) -> None:
    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier([key.public_key()], clock=lambda: T0)
    token = jwt.PyJWS().encode(json.dumps(payload).encode(), key, algorithm="EdDSA")

    with pytest.raises(ContractError) as info:
        verifier.verify(token, scope="read")

    assert info.value.code is ErrorCode.TOKEN_INVALID
