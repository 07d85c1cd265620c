"""Transport: certificates the server must refuse beyond plaintext, none and another CA.

Also revocation that holds: each certificate's DN carries its serial, so a
revoked or replaced certificate stays refused when its name is issued again.

(Plaintext, no certificate and another CA's certificate are in
``test_nats_server.py``, as is revoke-then-reload of a live identity.)

Certificates here are made with ``cryptography`` and signed by the test CA,
with the DN of an identity the server knows (``op-1``, an operator), so the
only thing wrong with each is what the test names. A control certificate
made the same way with sane dates connects, which proves the construction.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from natsfixtures import Clients, ErrorLog, FabricPki, make_pki, until_delivered

from fabric.connect import ConnectError, connect
from fabric.nats_server import NatsServer
from fabric.pki import (
    ORGANIZATION,
    active_identities,
    issue_identity,
    load_inventory,
    revoke_identity,
)

DAY = dt.timedelta(days=1)


def _make_cert(
    pki: FabricPki,
    out: Path,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    name: str = "op-1",
    role: str = "operator",
) -> tuple[Path, Path]:
    """A client certificate for ``name`` signed by the test CA, valid as told.

    For an identity the PKI issued, the subject is that certificate's own
    (serial included), so the server maps it to that user; for any other
    name it is the ``CN,OU,O`` subject older versions issued.
    """
    ca_cert = x509.load_pem_x509_certificate((pki.dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki.dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    if name in pki.identities:
        subject = x509.load_pem_x509_certificate(pki[name].cert.read_bytes()).subject
    else:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


async def _log_mentions(server: NatsServer, text: str, within: float = 5.0) -> None:
    """Poll the server log (written asynchronously) for ``text``."""
    deadline = time.monotonic() + within
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in log:\n{server.log_text()[-2000:]}"
        await asyncio.sleep(0.02)  # wait-ok: polled under a deadline, no event exists


async def test_a_certificate_made_here_with_sane_dates_connects(
    nats_server: NatsServer, pki: FabricPki, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = _make_cert(pki, tmp_path, not_before=now - DAY, not_after=now + DAY)
    nc = await connect(nats_server.url, ca=pki.ca, cert=cert, key=key)
    try:
        await nc.flush(timeout=5)
        assert nc.is_connected
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("label", "start", "end"),
    [
        ("expired", -10 * DAY, -DAY),
        ("expired a minute ago", -DAY, -dt.timedelta(minutes=1)),
        ("not yet valid", DAY, 10 * DAY),
    ],
)
async def test_a_certificate_outside_its_validity_is_refused(
    nats_server: NatsServer,
    pki: FabricPki,
    tmp_path: Path,
    label: str,
    start: dt.timedelta,
    end: dt.timedelta,
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = _make_cert(pki, tmp_path, not_before=now + start, not_after=now + end)
    with pytest.raises(ConnectError):
        await connect(nats_server.url, ca=pki.ca, cert=cert, key=key)
    # Go's verifier: "x509: certificate has expired or is not yet valid".
    await _log_mentions(nats_server, "certificate has expired or is not yet valid")


async def test_an_identity_revoked_and_issued_again_does_not_revive_the_old_certificate(
    tmp_path: Path,
) -> None:
    """Revoke a compromised identity, issue the name again: the stolen old
    certificate must stay refused after the reload (the server maps users by
    DN, so this needs more than the DN)."""
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller", "view-1": "viewer"})
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    old_cert = stolen / "view-1.crt"
    old_key = stolen / "view-1.key"
    old_cert.write_bytes(own["view-1"].cert.read_bytes())
    old_key.write_bytes(own["view-1"].key.read_bytes())
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        clients = Clients(own, server.url)
        try:
            revoke_identity(own.dir, "view-1")
            await server.reload()
            with pytest.raises(ConnectError, match="Authorization Violation"):
                await connect(server.url, ca=own.ca, cert=old_cert, key=old_key)
            issue_identity(own.dir, "viewer", "view-1", force=True)
            await server.reload()
            fresh = await clients("view-1")
            await fresh.flush(timeout=5)
            try:
                revived = await connect(server.url, ca=own.ca, cert=old_cert, key=old_key)
            except ConnectError as exc:
                assert "Authorization Violation" in str(exc)
            else:
                await revived.close()
                pytest.fail("the revoked certificate connects again once its name is re-issued")
            # The inventory says so: one active certificate, the old one replaced.
            entry = next(e for e in load_inventory(own.dir) if e.name == "view-1")
            assert not entry.revoked and entry.serial_in_dn
            assert entry.replaced == (f"{_serial(old_cert):x}",)
        finally:
            await clients.aclose()


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


async def test_a_rotated_certificate_is_refused_and_its_live_connection_closed(
    tmp_path: Path,
) -> None:
    """Re-issuing a name without revoking it (rotation, or a compromise handled
    by issuing again) replaces the certificate: after the reload the old one
    is dropped and refused, the new one connects with the same permissions
    (a node still publishes only under its own ``nodes.<id>.``)."""
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller", "n1": "node"})
    old = tmp_path / "old"
    old.mkdir()
    old_cert, old_key = old / "n1.crt", old / "n1.key"
    old_cert.write_bytes(own["n1"].cert.read_bytes())
    old_key.write_bytes(own["n1"].key.read_bytes())
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        clients = Clients(own, server.url)
        try:
            lost = asyncio.Event()

            async def on_lost() -> None:
                lost.set()

            ctl = await clients("ctl-1")
            live_old = await connect(
                server.url, ca=own.ca, cert=old_cert, key=old_key, disconnected_cb=on_lost
            )
            clients._opened.append(live_old)
            await live_old.flush(timeout=5)

            fresh = own.issue_again("node", "n1")
            assert fresh.serial is not None and fresh.serial != f"{_serial(old_cert):x}"
            await server.reload()
            async with asyncio.timeout(5):
                await lost.wait()
            with pytest.raises(ConnectError, match="Authorization Violation"):
                await connect(server.url, ca=own.ca, cert=old_cert, key=old_key)

            errors = ErrorLog()
            node = await clients("n1", error_cb=errors)
            sub = await ctl.subscribe("nodes.>")
            await ctl.flush()
            await until_delivered(lambda data: node.publish("nodes.n1.heartbeat", data), sub)
            await node.publish("nodes.n1.heartbeat", b"mine")
            await node.publish("nodes.n2.heartbeat", b"not mine")
            await node.flush()
            assert (await sub.next_msg(timeout=5)).data == b"mine"
            await errors.wait_for('permissions violation for publish to "nodes.n2.heartbeat"')
            # Nothing from nodes.n2 in between: the next message is the next own one.
            await node.publish("nodes.n1.heartbeat", b"mine again")
            assert (await sub.next_msg(timeout=5)).data == b"mine again"
        finally:
            await clients.aclose()


async def test_a_certificate_from_an_older_version_works_until_its_name_is_reissued(
    tmp_path: Path,
) -> None:
    """Migration: an identity issued before the serial was in the DN (subject
    ``CN,OU,O`` only, inventory without ``serial_in_dn``) keeps working; once
    its name is issued again, the old certificate is refused."""
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller"})
    now = dt.datetime.now(dt.UTC)
    legacy_cert, legacy_key = _make_cert(
        own, own.dir, not_before=now - DAY, not_after=now + DAY, name="op-9", role="operator"
    )
    (own.dir / "inventory.json").write_text(
        json.dumps(
            [
                *json.loads((own.dir / "inventory.json").read_text()),
                {
                    "name": "op-9",
                    "role": "operator",
                    "serial": f"{_serial(legacy_cert):x}",
                    "not_after": "2099-01-01T00:00:00Z",
                    "revoked": False,
                },
            ]
        )
    )
    [legacy] = [i for i in active_identities(own.dir) if i.name == "op-9"]
    assert legacy.serial is None and legacy.dn == "CN=op-9,OU=operator,O=agent-fabric"
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        nc = await connect(server.url, ca=own.ca, cert=legacy_cert, key=legacy_key)
        await nc.flush(timeout=5)
        await nc.close()
        stash = tmp_path / "stash"
        stash.mkdir()
        (stash / "op-9.crt").write_bytes(legacy_cert.read_bytes())
        (stash / "op-9.key").write_bytes(legacy_key.read_bytes())
        issued = issue_identity(own.dir, "operator", "op-9", force=True)
        await server.reload()
        with pytest.raises(ConnectError, match="Authorization Violation"):
            await connect(server.url, ca=own.ca, cert=stash / "op-9.crt", key=stash / "op-9.key")
        nc = await connect(server.url, ca=own.ca, cert=issued.cert, key=issued.key)
        await nc.flush(timeout=5)
        await nc.close()


async def test_a_client_picks_up_its_rotated_certificate_when_the_reload_drops_it(
    tmp_path: Path,
) -> None:
    """Rotation without a restart: the files at the client's cert/key paths are
    replaced (``issue --force`` here), the server reloads and drops the old
    certificate's connection, and the same client reconnects presenting the
    new certificate, with its node permissions."""
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller", "n1": "node"})
    old_serial = own["n1"].serial
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        clients = Clients(own, server.url)
        try:
            lost, back = asyncio.Event(), asyncio.Event()

            async def on_lost() -> None:
                lost.set()

            async def on_back() -> None:
                back.set()

            ctl = await clients("ctl-1")
            node = await clients("n1", disconnected_cb=on_lost, reconnected_cb=on_back)
            await node.flush(timeout=5)

            fresh = own.issue_again("node", "n1")  # same paths, new certificate
            assert fresh.cert == own["n1"].cert and fresh.serial != old_serial
            await server.reload()
            async with asyncio.timeout(10):
                await lost.wait()
                await back.wait()
            # Only the new certificate maps to a user now, so this reconnect presented it.
            assert node.is_connected
            sub = await ctl.subscribe("nodes.n1.heartbeat")
            await ctl.flush()
            await until_delivered(lambda data: node.publish("nodes.n1.heartbeat", data), sub)
            await node.publish("nodes.n1.heartbeat", b"after rotation")
            assert (await sub.next_msg(timeout=5)).data == b"after rotation"
        finally:
            await clients.aclose()


async def test_a_client_cut_off_by_the_reload_comes_back_once_its_new_files_arrive(
    tmp_path: Path,
) -> None:
    """The other order of a rotation: the servers learn of the new certificate
    first, so the client (still holding the old files) is dropped and refused
    while it retries; when the new files land at its paths it gets back in."""
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller", "n1": "node"})
    host = tmp_path / "host-pki"  # the files as the client's host has them
    host.mkdir()
    cert, key = host / "n1.crt", host / "n1.key"
    cert.write_bytes(own["n1"].cert.read_bytes())
    key.write_bytes(own["n1"].key.read_bytes())
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        refused, lost, back = ErrorLog(), asyncio.Event(), asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        async def on_back() -> None:
            back.set()

        nc = await connect(
            server.url,
            ca=own.ca,
            cert=cert,
            key=key,
            error_cb=refused,
            disconnected_cb=on_lost,
            reconnected_cb=on_back,
        )
        try:
            fresh = own.issue_again("node", "n1")
            await server.reload()
            async with asyncio.timeout(10):
                await lost.wait()
            # Still the old files: every attempt is refused, and the client keeps trying.
            await refused.wait_for("authorization violation", within=10)
            assert not back.is_set() and not nc.is_closed
            key.write_bytes(fresh.key.read_bytes())
            cert.write_bytes(fresh.cert.read_bytes())
            async with asyncio.timeout(10):
                await back.wait()
            await nc.flush(timeout=5)
            assert nc.is_connected
        finally:
            await nc.close()
