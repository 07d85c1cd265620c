"""fabric.pki: the files it makes work with Python's ssl, and it refuses what it should."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fabric import pki
from fabric.pki import (
    ROLES,
    Identity,
    PkiError,
    active_identities,
    init_pki,
    issue_identity,
    load_inventory,
    revoke_identity,
    subject_dn,
    write_file_atomic,
)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory, hosts=["10.0.0.7", "nats.example.com", "fd00::5"])
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """Run a TLS handshake in memory and return the server's end."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, end in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    end.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return s
    raise AssertionError("handshake did not finish")


def test_public_names() -> None:
    assert set(pki.__all__) >= {
        "ROLES",
        "Identity",
        "InventoryEntry",
        "PkiError",
        "active_identities",
        "init_pki",
        "issue_identity",
        "load_inventory",
        "revoke_identity",
    }
    assert ROLES == ("controller", "node", "operator", "viewer", "worker")


def test_mutual_tls_handshake_with_python_ssl(pki_dir: Path) -> None:
    identity = issue_identity(pki_dir, "node", "node-1")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki_dir / "ca.crt")
    client.load_cert_chain(identity.cert, identity.key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki_dir / "ca.crt")
    server.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    server.verify_mode = ssl.CERT_REQUIRED

    end = _handshake(client, server)

    peer = end.getpeercert(binary_form=True)
    assert peer is not None
    assert subject_dn(x509.load_der_x509_certificate(peer)) == identity.dn


def test_client_certificate_refused_by_another_ca(pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_pki(other)
    stranger = issue_identity(other, "node", "node-1")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki_dir / "ca.crt")
    client.load_cert_chain(stranger.cert, stranger.key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki_dir / "ca.crt")
    server.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    server.verify_mode = ssl.CERT_REQUIRED

    with pytest.raises(ssl.SSLError):
        _handshake(client, server)


def test_ca_certificate_extensions(pki_dir: Path) -> None:
    ca = _cert(pki_dir / "ca.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical
    assert constraints.value.ca
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert ca.subject.rfc4514_string() == "CN=agent-fabric CA,O=agent-fabric"


def test_server_certificate_sans_and_usages(pki_dir: Path) -> None:
    server = _cert(pki_dir / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "nats.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::5"),
    ]
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    server.verify_directly_issued_by(_cert(pki_dir / "ca.crt"))


def test_client_certificate_shape(pki_dir: Path) -> None:
    identity = issue_identity(pki_dir, "operator", "alice")
    cert = _cert(identity.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cert.verify_directly_issued_by(_cert(pki_dir / "ca.crt"))
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert subject_dn(cert) == identity.dn
    # The DN carries the certificate's own serial: one certificate, one user.
    assert identity.serial == f"{cert.serial_number:x}"
    assert identity.dn == f"serialNumber={identity.serial},CN=alice,OU=operator,O=agent-fabric"


def test_identity_dn() -> None:
    legacy = Identity(name="node-1", role="node", cert=Path("a"), key=Path("b"))
    assert legacy.dn == "CN=node-1,OU=node,O=agent-fabric"
    pinned = Identity(name="node-1", role="node", cert=Path("a"), key=Path("b"), serial="ab01")
    assert pinned.dn == "serialNumber=ab01,CN=node-1,OU=node,O=agent-fabric"


def test_reissue_gives_a_new_dn_and_remembers_the_old_serial(pki_dir: Path) -> None:
    first = issue_identity(pki_dir, "node", "node-1")
    revoke_identity(pki_dir, "node-1")
    second = issue_identity(pki_dir, "node", "node-1", force=True)
    third = issue_identity(pki_dir, "node", "node-1", force=True)

    assert len({first.dn, second.dn, third.dn}) == 3
    [entry] = load_inventory(pki_dir)
    assert (entry.serial, entry.revoked, entry.serial_in_dn) == (third.serial, False, True)
    assert entry.replaced == (first.serial, second.serial)
    assert active_identities(pki_dir) == [third]


def test_an_inventory_from_an_older_version_still_loads(pki_dir: Path) -> None:
    (pki_dir / "inventory.json").write_text(
        '[{"name": "old-1", "role": "viewer", "serial": "1f", "not_after": "2099-01-01T00:00:00Z",'
        ' "revoked": false}]'
    )
    [entry] = load_inventory(pki_dir)
    assert (entry.serial_in_dn, entry.replaced) == (False, ())
    [ident] = active_identities(pki_dir)
    assert ident.serial is None and ident.dn == "CN=old-1,OU=viewer,O=agent-fabric"


def test_file_modes(pki_dir: Path) -> None:
    identity = issue_identity(pki_dir, "worker", "w1")
    for key in ("ca.key", "server.key", "signing.key", identity.key.name):
        assert stat.S_IMODE((pki_dir / key).stat().st_mode) == 0o600, key
    for public in ("ca.crt", "server.crt", "signing.pub", identity.cert.name):
        assert stat.S_IMODE((pki_dir / public).stat().st_mode) == 0o644, public
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    assert not [p for p in pki_dir.iterdir() if p.name.startswith(".")]


def test_init_refuses_to_overwrite(pki_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in pki_dir.iterdir()}

    with pytest.raises(PkiError, match=r"ca\.crt already exists: use --force") as info:
        init_pki(pki_dir)

    assert str(pki_dir) in str(info.value)
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == before


def test_init_refuses_when_any_one_file_exists(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "signing.key").write_text("precious")

    with pytest.raises(PkiError, match=r"signing\.key already exists"):
        init_pki(directory)

    assert sorted(p.name for p in directory.iterdir()) == ["signing.key"]


def test_init_force_replaces_everything(pki_dir: Path) -> None:
    issue_identity(pki_dir, "node", "node-1")
    old_ca = (pki_dir / "ca.crt").read_bytes()
    old_signing = (pki_dir / "signing.pub").read_bytes()

    init_pki(pki_dir, force=True)

    assert (pki_dir / "ca.crt").read_bytes() != old_ca
    assert (pki_dir / "signing.pub").read_bytes() != old_signing
    # Certificates from the old CA no longer verify, so none stays listed.
    assert load_inventory(pki_dir) == []


def test_issue_refuses_to_overwrite_then_forces(pki_dir: Path) -> None:
    first = issue_identity(pki_dir, "node", "node-1")
    old_cert = first.cert.read_bytes()

    with pytest.raises(PkiError, match=r"node-1\.crt already exists: use --force"):
        issue_identity(pki_dir, "node", "node-1")

    assert first.cert.read_bytes() == old_cert
    again = issue_identity(pki_dir, "controller", "node-1", force=True)
    entries = load_inventory(pki_dir)
    assert again.cert.read_bytes() != old_cert
    assert [(e.name, e.role) for e in entries] == [("node-1", "controller")]


@pytest.mark.parametrize("role", ["admin", "", "Node", "nodes"])
def test_unknown_role(pki_dir: Path, role: str) -> None:
    with pytest.raises(PkiError, match="unknown role") as info:
        issue_identity(pki_dir, role, "x1")

    assert "controller, node, operator, viewer, worker" in str(info.value)


@pytest.mark.parametrize(
    "name", ["", "Upper", "a.b", "-lead", "_lead", "a b", "../etc", "x" * 64, "n1\n", "a*"]
)
def test_bad_name(pki_dir: Path, name: str) -> None:
    with pytest.raises(PkiError, match="bad identity name"):
        issue_identity(pki_dir, "node", name)

    assert sorted(p.name for p in pki_dir.glob("*.crt")) == ["ca.crt", "server.crt"]


@pytest.mark.parametrize("name", ["ca", "server", "signing", "inventory"])
def test_reserved_name(pki_dir: Path, name: str) -> None:
    ca_key = (pki_dir / "ca.key").read_bytes()

    with pytest.raises(PkiError, match="reserved"):
        issue_identity(pki_dir, "node", name, force=True)

    assert (pki_dir / "ca.key").read_bytes() == ca_key


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError) as info:
        issue_identity(tmp_path / "empty", "node", "node-1")

    assert str(info.value) == (
        f"no CA in {tmp_path / 'empty'}: run `fabric pki init --dir {tmp_path / 'empty'}` first"
    )


@pytest.mark.parametrize("days", [0, -1, 10**6])
def test_bad_days(tmp_path: Path, days: int) -> None:
    with pytest.raises(PkiError, match="days"):
        init_pki(tmp_path / "pki", days=days)

    assert not (tmp_path / "pki").exists()


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    init_pki(directory, days=10)

    identity = issue_identity(directory, "node", "node-1", days=400)

    ca = _cert(directory / "ca.crt")
    assert _cert(identity.cert).not_valid_after_utc == ca.not_valid_after_utc


def test_inventory_records_issue_and_revoke(pki_dir: Path) -> None:
    node = issue_identity(pki_dir, "node", "node-1")
    issue_identity(pki_dir, "viewer", "bob", days=30)

    revoke_identity(pki_dir, "node-1")

    entries = {e.name: e for e in load_inventory(pki_dir)}
    assert entries["node-1"].revoked
    assert not entries["bob"].revoked
    assert entries["node-1"].serial == f"{_cert(node.cert).serial_number:x}"
    assert entries["bob"].not_after.endswith("Z")
    assert [i.name for i in active_identities(pki_dir)] == ["bob"]
    assert node.cert.exists()  # revocation deletes nothing
    raw = json.loads((pki_dir / "inventory.json").read_text())
    assert {e["name"] for e in raw} == {"node-1", "bob"}


def test_active_identities_paths(pki_dir: Path) -> None:
    issued = issue_identity(pki_dir, "controller", "ctl-1")

    assert active_identities(pki_dir) == [issued]


def test_revoke_unknown(pki_dir: Path) -> None:
    with pytest.raises(PkiError, match="no identity named 'ghost'"):
        revoke_identity(pki_dir, "ghost")


def test_load_inventory_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no CA in"):
        load_inventory(tmp_path)


def test_damaged_inventory(pki_dir: Path) -> None:
    (pki_dir / "inventory.json").write_text("{not json")

    with pytest.raises(PkiError, match="damaged"):
        load_inventory(pki_dir)


def test_write_file_atomic_no_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_file_atomic(target, b"one", mode=0o600, force=False)

    with pytest.raises(PkiError, match="already exists"):
        write_file_atomic(target, b"two", mode=0o600, force=False)

    assert target.read_bytes() == b"one"
    write_file_atomic(target, b"three", mode=0o644, force=True)
    assert target.read_bytes() == b"three"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
