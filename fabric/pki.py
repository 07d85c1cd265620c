"""The fabric's own certificate authority: files on disk, made with ``cryptography``.

One directory holds everything::

    ca.crt ca.key             the CA (P-256, 0600 key)
    server.crt server.key     nats-server's certificate (serverAuth + clientAuth)
    signing.key signing.pub   the Ed25519 pair that signs operator tokens
    <name>.crt <name>.key     one client identity per name
    inventory.json            every identity issued, with its revocation mark

nats-server maps a client certificate to a user by its subject DN
(``verify_and_map``; every RDN must match, in any order), so client
certificates carry no SAN and a subject of exactly
``serialNumber=<serial>,CN=<name>,OU=<role>,O=agent-fabric``, where
``<serial>`` is the certificate's own serial number in lowercase hex. The user
list the server loads is generated from :func:`active_identities`: one user
per name, for the name's latest certificate only. So each certificate is its
own user: revoking a name drops its user, and issuing the name again lists the
new certificate's DN, never the old one, so a revoked or replaced certificate
stays refused whatever happens to its name later.

Identities issued before the serial went into the DN (``serial_in_dn`` false
in the inventory) keep their old ``CN=<name>,OU=<role>,O=agent-fabric`` user
until they are issued again; that DN is shared by every certificate ever made
for the name, so re-issue them (``fabric pki issue --force``) to close it.

Every key is ECDSA P-256: both nats-server (Go) and Python's ``ssl`` accept it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.ids import ID_PATTERN

__all__ = [
    "ORGANIZATION",
    "RESERVED_NAMES",
    "ROLES",
    "Identity",
    "InventoryEntry",
    "PkiError",
    "active_identities",
    "init_pki",
    "issue_identity",
    "load_inventory",
    "revoke_identity",
    "subject_dn",
    "write_file_atomic",
]

ROLES: tuple[str, ...] = ("controller", "node", "operator", "viewer", "worker")
ORGANIZATION = "agent-fabric"
# These names are files of the PKI itself; an identity called "ca" would
# overwrite the CA's key.
RESERVED_NAMES: frozenset[str] = frozenset({"ca", "server", "signing", "inventory"})

MAX_DAYS = 36500  # datetime overflows long before x509 does; 100 years is plenty.
# Certificates start a little in the past so a peer whose clock lags ours
# does not reject a certificate made a second ago.
_BACKDATE = dt.timedelta(minutes=5)
_ID_RE = re.compile(ID_PATTERN)

_CA_CERT = "ca.crt"
_CA_KEY = "ca.key"
_SERVER_CERT = "server.crt"
_SERVER_KEY = "server.key"
_INVENTORY = "inventory.json"
_DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


class PkiError(Exception):
    """A PKI operation refused: the message is one line meant for a human."""


@dataclass(frozen=True)
class Identity:
    """A client certificate and its key, as nats-server will see it."""

    name: str
    role: str
    cert: Path
    key: Path
    serial: str | None = None
    """Lowercase hex serial carried in the subject (``serialNumber``); None for an
    identity issued before that (its DN is shared by every certificate of the name)."""

    @property
    def dn(self) -> str:
        # The string nats-server's verify_and_map compares against the
        # configured user (RFC 4514 order, most specific first); names, roles
        # and hex serials need no escaping.
        dn = f"CN={self.name},OU={self.role},O={ORGANIZATION}"
        return dn if self.serial is None else f"serialNumber={self.serial},{dn}"


MAX_REPLACED = 32
"""How many earlier serials of one name the inventory remembers (for ``fabric pki list``)."""


class InventoryEntry(msgspec.Struct, frozen=True):
    """One issued identity: the latest certificate of its name.

    ``serial`` is lowercase hex: a 159-bit int does not survive JSON readers
    that use doubles. ``serial_in_dn``: the certificate's subject carries the
    serial, so the server's user is this certificate alone (false for
    identities issued by older versions). ``replaced``: serials of earlier
    certificates of this name, newest last; none of them is accepted any more.
    """

    name: str
    role: str
    serial: str
    not_after: str
    revoked: bool = False
    serial_in_dn: bool = False
    replaced: tuple[str, ...] = ()


# -- files --------------------------------------------------------------------


def write_file_atomic(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with ``mode``, all or nothing.

    The bytes go to a temporary file in the same directory, created with
    ``mode`` from the start so a private key is never readable by others, even
    for a moment. Without ``force`` the file is linked into place, which fails
    if the name exists, so two racing writers cannot overwrite each other.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp creates 0600; fchmod sets the exact mode regardless of umask.
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _exists_error(path) from None
    finally:
        tmp.unlink(missing_ok=True)


def _exists_error(path: Path) -> PkiError:
    return PkiError(f"{path} already exists: use --force to overwrite it")


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    # Checked before writing anything, so a refused run leaves no half-made PKI.
    if force:
        return
    for path in paths:
        if path.exists():
            raise _exists_error(path)


def _make_dir(pki_dir: Path) -> None:
    try:
        pki_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        # A directory the user already had keeps its mode: the keys are 0600 anyway,
        # and silently tightening, say, a home directory would surprise.
        return
    # mkdir's mode is filtered by the umask.
    os.chmod(pki_dir, 0o700)


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    # The inventory is read, changed and written back; two `fabric pki issue`
    # at once must not lose one of the entries. flock on the directory itself
    # needs no extra lock file.
    fd = os.open(pki_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- checks -------------------------------------------------------------------


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise PkiError(f"days must be a whole number from 1 to {MAX_DAYS}, not {days!r}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _ID_RE.fullmatch(name) is None:
        raise PkiError(
            f"bad identity name {name!r}: use 1 to 63 lowercase letters, digits, '_' or '-',"
            " starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise PkiError(
            f"identity name {name!r} is reserved for the PKI's own files"
            f" ({', '.join(sorted(RESERVED_NAMES))})"
        )


def _no_ca_error(pki_dir: Path) -> PkiError:
    return PkiError(f"no CA in {pki_dir}: run `fabric pki init --dir {pki_dir}` first")


# -- certificates -------------------------------------------------------------


def _name(common_name: str, unit: str | None = None, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def subject_dn(cert: x509.Certificate) -> str:
    """A certificate's subject in the form :attr:`Identity.dn` and nats-server use."""
    return cert.subject.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def _leaf_key_usage() -> x509.KeyUsage:
    # ECDHE with an ECDSA certificate needs only digitalSignature.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or not host.isascii():
        raise PkiError(f"bad --host {host!r}: give an IP address or an ASCII DNS name")
    return x509.DNSName(host.lower())


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in (*_DEFAULT_HOSTS, *hosts):
        san = _san_for(host)
        if san not in sans:
            sans.append(san)
    return sans


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _make_ca(days: int, now: dt.datetime) -> _Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{ORGANIZATION} CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Ca(cert=cert, key=key)


def _make_leaf(
    ca: _Ca,
    subject: x509.Name,
    *,
    days: int,
    now: dt.datetime,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    serial: int | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A certificate cannot be trusted past its issuer, so it is not made to claim so.
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Python 3.13's default context is X509-strict and wants the AKI.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _load_ca(pki_dir: Path) -> _Ca:
    cert_path, key_path = pki_dir / _CA_CERT, pki_dir / _CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise _no_ca_error(pki_dir)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise PkiError(f"cannot read the CA in {pki_dir}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    return _Ca(cert=cert, key=key)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# -- inventory ----------------------------------------------------------------

_inventory_decoder = msgspec.json.Decoder(list[InventoryEntry])


def load_inventory(pki_dir: Path) -> list[InventoryEntry]:
    """Every identity ever issued here (the latest per name), revoked ones included."""
    path = pki_dir / _INVENTORY
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not (pki_dir / _CA_CERT).is_file():
            raise _no_ca_error(pki_dir) from None
        return []
    try:
        return _inventory_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise PkiError(f"{path} is damaged: {exc}") from None


def _write_inventory(pki_dir: Path, entries: Sequence[InventoryEntry], *, force: bool) -> None:
    data = msgspec.json.format(msgspec.json.encode(list(entries)), indent=2) + b"\n"
    write_file_atomic(pki_dir / _INVENTORY, data, mode=0o644, force=force)


def active_identities(pki_dir: Path) -> list[Identity]:
    """The identities nats-server should accept: issued here and not revoked.

    Each is the latest certificate of its name; with ``serial_in_dn`` its DN
    names that certificate only.
    """
    return [
        Identity(
            name=entry.name,
            role=entry.role,
            cert=pki_dir / f"{entry.name}.crt",
            key=pki_dir / f"{entry.name}.key",
            serial=entry.serial if entry.serial_in_dn else None,
        )
        for entry in load_inventory(pki_dir)
        if not entry.revoked
    ]


# -- operations ---------------------------------------------------------------


def init_pki(
    pki_dir: Path,
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> None:
    """Make a CA, the server certificate, the token signing pair and an empty inventory.

    ``hosts`` are added to the server certificate's SANs next to localhost,
    127.0.0.1 and ::1: as an IP SAN when the text parses as an address, else
    as a DNS SAN. The CA lives ``days`` days, and nothing it issues outlives it.
    With ``force`` everything is replaced, and the inventory starts empty,
    since certificates from the old CA no longer verify.
    """
    # Lazy import: fabric.tokens imports this module for PkiError and the writer.
    from fabric.tokens import SIGNING_KEY, SIGNING_PUB, write_signing_keypair

    _check_days(days)
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of host names, not one string")
    sans = _sans(hosts)
    names = (_CA_CERT, _CA_KEY, _SERVER_CERT, _SERVER_KEY, SIGNING_KEY, SIGNING_PUB, _INVENTORY)
    _refuse_existing([pki_dir / n for n in names], force)
    _make_dir(pki_dir)

    now = dt.datetime.now(dt.UTC)
    ca = _make_ca(days, now)
    server_cert, server_key = _make_leaf(
        ca,
        _name(f"{ORGANIZATION} server"),
        days=days,
        now=now,
        # clientAuth too: cluster routes are mutual TLS with this same certificate.
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        sans=sans,
    )
    with _locked(pki_dir):
        # Keys before certificates: a reader that finds a certificate finds its key.
        write_file_atomic(pki_dir / _CA_KEY, _key_pem(ca.key), mode=0o600, force=force)
        write_file_atomic(pki_dir / _CA_CERT, _cert_pem(ca.cert), mode=0o644, force=force)
        write_file_atomic(pki_dir / _SERVER_KEY, _key_pem(server_key), mode=0o600, force=force)
        write_file_atomic(pki_dir / _SERVER_CERT, _cert_pem(server_cert), mode=0o644, force=force)
        write_signing_keypair(pki_dir, force=force)
        _write_inventory(pki_dir, [], force=force)


def issue_identity(
    pki_dir: Path,
    role: str,
    name: str,
    *,
    days: int = 365,
    force: bool = False,
) -> Identity:
    """Issue ``<name>.crt`` / ``<name>.key``: a client certificate for one user of ``role``.

    The certificate has the clientAuth usage only and no SAN, so nats-server
    maps it by its DN (:attr:`Identity.dn`), which carries the certificate's
    serial. With ``force`` the name's earlier certificate (revoked or not) is
    replaced: once the server reloads, only the new one is accepted. It never
    outlives the CA.
    """
    _check_role(role)
    _check_name(name)
    _check_days(days)
    ca = _load_ca(pki_dir)
    identity = Identity(
        name=name, role=role, cert=pki_dir / f"{name}.crt", key=pki_dir / f"{name}.key"
    )
    with _locked(pki_dir):
        _refuse_existing([identity.cert, identity.key], force)
        entries = load_inventory(pki_dir)
        if not force and any(e.name == name for e in entries):
            raise PkiError(
                f"an identity named {name!r} was already issued in {pki_dir}:"
                " use --force to issue it again"
            )
        serial = x509.random_serial_number()
        hex_serial = f"{serial:x}"
        identity = Identity(
            name=name, role=role, cert=identity.cert, key=identity.key, serial=hex_serial
        )
        cert, key = _make_leaf(
            ca,
            _name(name, unit=role, serial=hex_serial),
            days=days,
            now=dt.datetime.now(dt.UTC),
            usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            sans=(),
            serial=serial,
        )
        write_file_atomic(identity.key, _key_pem(key), mode=0o600, force=force)
        write_file_atomic(identity.cert, _cert_pem(cert), mode=0o644, force=force)
        previous = next((e for e in entries if e.name == name), None)
        replaced = () if previous is None else (*previous.replaced, previous.serial)
        entry = InventoryEntry(
            name=name,
            role=role,
            serial=hex_serial,
            not_after=_rfc3339(cert.not_valid_after_utc),
            serial_in_dn=True,
            replaced=replaced[-MAX_REPLACED:],
        )
        _write_inventory(pki_dir, [*(e for e in entries if e.name != name), entry], force=True)
    return identity


def revoke_identity(pki_dir: Path, name: str) -> None:
    """Mark ``name`` revoked in the inventory; its files stay where they are.

    Revocation takes effect when the server's user list is regenerated from
    :func:`active_identities`: nats-server then maps the certificate to no user
    (and closes its live connections). Issuing the name again later lists the
    new certificate's DN only, so this certificate stays refused.
    """
    if not (pki_dir / _CA_CERT).is_file():
        raise _no_ca_error(pki_dir)
    with _locked(pki_dir):
        entries = load_inventory(pki_dir)
        if not any(e.name == name for e in entries):
            raise PkiError(f"no identity named {name!r} in {pki_dir}")
        updated = [
            msgspec.structs.replace(e, revoked=True) if e.name == name else e for e in entries
        ]
        _write_inventory(pki_dir, updated, force=True)
