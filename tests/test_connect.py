"""fabric.connect: settings from the environment, fast and clear failures, reconnects."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats.errors
import pytest
from nats.aio.msg import Msg
from natsfixtures import Clients, ErrorLog, FabricPki, make_pki
from netproxy import CuttableProxy

from fabric.connect import ConnectError, connect, parse_urls, tls_context
from fabric.nats_server import NatsServer, free_port

ENV = ("FABRIC_NATS_URL", "FABRIC_CA", "FABRIC_CERT", "FABRIC_KEY")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _env(monkeypatch: pytest.MonkeyPatch, url: str, pki: FabricPki, name: str) -> None:
    monkeypatch.setenv("FABRIC_NATS_URL", url)
    monkeypatch.setenv("FABRIC_CA", str(pki.ca))
    monkeypatch.setenv("FABRIC_CERT", str(pki[name].cert))
    monkeypatch.setenv("FABRIC_KEY", str(pki[name].key))


def test_parse_urls() -> None:
    assert parse_urls(" tls://a:1, ,tls://b:2 ") == ["tls://a:1", "tls://b:2"]
    assert parse_urls(["tls://a:1", ""]) == ["tls://a:1"]


async def test_settings_from_the_environment(
    nats_server: NatsServer, pki: FabricPki, clean_env: pytest.MonkeyPatch
) -> None:
    # A dead URL first: the first connection moves on to the next one.
    dead = f"tls://127.0.0.1:{free_port()}"
    _env(clean_env, f"{dead},{nats_server.url}", pki, "op-1")
    nc = await connect(name="env-test")
    try:
        assert nc.is_connected
        assert nc.options["name"] == "env-test"
        # From now on it reconnects forever, quickly, and notices dead peers fast.
        assert nc.options["allow_reconnect"] is True
        assert nc.options["max_reconnect_attempts"] == -1
        assert nc.options["ping_interval"] <= 5
        await nc.publish("agents.x.commands", b"{}")
        await nc.flush(timeout=5)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("FABRIC_NATS_URL", "no NATS URL: pass one or set FABRIC_NATS_URL"),
        ("FABRIC_CA", "no CA certificate: pass it or set FABRIC_CA"),
        ("FABRIC_CERT", "no client certificate: pass it or set FABRIC_CERT"),
        ("FABRIC_KEY", "no client key: pass it or set FABRIC_KEY"),
    ],
)
async def test_missing_settings_are_named(
    pki: FabricPki, clean_env: pytest.MonkeyPatch, missing: str, message: str
) -> None:
    _env(clean_env, "tls://127.0.0.1:1", pki, "op-1")
    clean_env.delenv(missing)
    with pytest.raises(ConnectError) as info:
        await connect()
    assert str(info.value) == message


async def test_missing_file_is_named(pki: FabricPki, tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match=r"TLS file not found: client certificate .*nope\.crt"):
        await connect("tls://127.0.0.1:1", ca=pki.ca, cert=tmp_path / "nope.crt", key=tmp_path)
    with pytest.raises(ConnectError, match="TLS file not found"):
        tls_context(tmp_path / "ca.crt", pki["op-1"].cert, pki["op-1"].key)


async def test_refused_server_fails_fast(pki: FabricPki) -> None:
    urls = [f"tls://127.0.0.1:{free_port()}", f"tls://127.0.0.1:{free_port()}"]
    started = time.monotonic()
    with pytest.raises(ConnectError, match="connection refused") as info:
        await connect(urls, ca=pki.ca, cert=pki["op-1"].cert, key=pki["op-1"].key)
    assert time.monotonic() - started < 5
    assert "\n" not in str(info.value)
    assert urls[0] in str(info.value)


async def test_refused_certificate_fails_fast_and_says_why(
    nats_server: NatsServer, pki: FabricPki, tmp_path: Path
) -> None:
    stranger = make_pki(tmp_path / "pki", {"op-1": "operator"})
    started = time.monotonic()
    # Signed by a CA the server does not know.
    with pytest.raises(ConnectError, match=r"no or unacceptable client certificate|TLS"):
        await connect(
            nats_server.url, ca=pki.ca, cert=stranger["op-1"].cert, key=stranger["op-1"].key
        )
    # Our server is not trusted by the stranger's CA.
    with pytest.raises(ConnectError, match="TLS handshake failed"):
        await connect(nats_server.url, ca=stranger.ca, cert=pki["op-1"].cert, key=pki["op-1"].key)
    # Right CA, but no user maps to this certificate.
    with pytest.raises(ConnectError, match="Authorization Violation"):
        await connect(
            nats_server.url, ca=pki.ca, cert=pki.dir / "server.crt", key=pki.dir / "server.key"
        )
    assert time.monotonic() - started < 5


async def test_error_cb_override_receives_errors_after_connect(connect_as: Clients) -> None:
    errors = ErrorLog()
    viewer = await connect_as("view-1", error_cb=errors)
    await viewer.publish("agents.x.commands", b"{}")
    await viewer.flush()
    await errors.wait_for('permissions violation for publish to "agents.x.commands"')


async def test_reconnects_when_the_server_comes_back(tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller"})
    server = NatsServer.local(own.dir, tmp_path / "state")
    await server.start()
    clients = Clients(own, server.url)
    try:
        lost, back = asyncio.Event(), asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        async def on_back() -> None:
            back.set()

        nc = await clients("ctl-1", disconnected_cb=on_lost, reconnected_cb=on_back)
        await server.stop()
        async with asyncio.timeout(5):
            await lost.wait()
        await server.start()  # same port
        async with asyncio.timeout(10):
            await back.wait()
        sub = await nc.subscribe("events.x")
        await nc.publish("events.x", b"again")
        assert (await sub.next_msg(timeout=5)).data == b"again"
    finally:
        await clients.aclose()
        await server.stop()


async def test_replies_come_back_on_the_identity_own_inboxes(connect_as: Clients) -> None:
    viewer = await connect_as("view-1")
    assert viewer.new_inbox().startswith("_INBOX.view-1.")
    # A request through the server: the reply lands on that inbox, which the
    # viewer may read while others' inboxes stay closed to it.
    ctl = await connect_as("ctl-1")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"pong")

    await ctl.subscribe("fabric.discover", cb=answer)
    await ctl.flush()
    reply = await viewer.request("fabric.discover", b"ping", timeout=5)
    assert reply.data == b"pong"
    assert reply.subject.startswith("_INBOX.view-1.")


async def test_a_flush_that_timed_out_during_a_cut_leaves_the_connection_working(
    pki: FabricPki, nats_server: NatsServer, connect_as: Clients
) -> None:
    """nats-py leaves a timed-out flush's PING waiting for its PONG; when the link
    heals, that late PONG met a cancelled future and ended the client's read loop,
    so it heard nothing until its pings declared the connection stale (about 6 s,
    then a reconnect). A node probing its contact with flush() hit exactly that."""
    proxy = CuttableProxy("127.0.0.1", nats_server.settings.port)
    await proxy.start()
    viewer = await connect(
        proxy.url, ca=pki.ca, cert=pki["view-1"].cert, key=pki["view-1"].key, ping_interval=30
    )
    try:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            await got.put(msg.data)

        await viewer.subscribe("nodes.n1.heartbeat", cb=collect)
        await viewer.flush()
        proxy.cut()
        with pytest.raises(nats.errors.TimeoutError):
            await viewer.flush(timeout=0.2)
        proxy.heal()
        # Its late PONG now comes through; then a message must still arrive on
        # the same connection, with no reconnect in between.
        await viewer.flush(timeout=5)
        node = await connect_as("n1")
        await node.publish("nodes.n1.heartbeat", b"beat")
        await node.flush()
        assert await asyncio.wait_for(got.get(), 5) == b"beat"
        assert viewer.stats["reconnects"] == 0
    finally:
        await viewer.close()
        await proxy.close()
