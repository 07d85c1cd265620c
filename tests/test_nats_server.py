"""The embedded nats-server: mTLS only, DN-mapped users, reload without restart, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import pytest
from natsfixtures import Clients, FabricPki, make_pki, until_delivered

from fabric.cli import main as cli_main
from fabric.connect import ConnectError, connect
from fabric.nats_config import ClusterSettings, ServerSettings, render_server_config
from fabric.nats_server import NatsServer, find_nats_server
from fabric.pki import issue_identity, revoke_identity

ROOT = Path(__file__).resolve().parents[1]
REFUSED = (nats.errors.Error, OSError, ssl.SSLError, TimeoutError)


async def _log_mentions(server: NatsServer, text: str, within: float = 5.0) -> None:
    """Poll the server log (it is written asynchronously) for ``text``."""
    deadline = time.monotonic() + within
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in log:\n{server.log_text()[-2000:]}"
        await asyncio.sleep(0.02)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets owned by ``pid`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_binary_is_found() -> None:
    path = find_nats_server()
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert "nats-server" in out.stdout


async def test_plaintext_client_is_refused(nats_server: NatsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.settings.port)
    try:
        line = await reader.readline()
        assert line.startswith(b"INFO ")
        info = json.loads(line[5:])
        assert info["tls_required"] is True
        assert info["tls_verify"] is True
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        async with asyncio.timeout(5):
            rest = await reader.read()  # until the server hangs up
        assert b"PONG" not in rest
    finally:
        writer.close()

    with pytest.raises(REFUSED):
        await nats.connect(
            f"nats://127.0.0.1:{nats_server.settings.port}",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=2,
        )


async def test_client_without_certificate_is_refused(
    nats_server: NatsServer, pki: FabricPki
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    with pytest.raises(REFUSED):
        await nats.connect(
            nats_server.url,
            tls=ctx,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=2,
        )
    await _log_mentions(nats_server, "didn't provide a certificate")


async def test_certificate_from_another_ca_is_refused(
    nats_server: NatsServer, pki: FabricPki, tmp_path: Path
) -> None:
    # Same name, same role, same DN: only the issuer differs.
    other = make_pki(tmp_path / "other", {"ctl-1": "controller"})
    with pytest.raises(ConnectError):
        await connect(nats_server.url, ca=pki.ca, cert=other["ctl-1"].cert, key=other["ctl-1"].key)
    await _log_mentions(nats_server, "certificate signed by unknown authority")


@pytest.mark.parametrize("name", ["ctl-1", "n1", "n2", "op-1", "view-1", "work-1"])
async def test_every_issued_identity_connects(connect_as: Clients, name: str) -> None:
    nc = await connect_as(name)
    await nc.flush(timeout=5)
    assert nc.is_connected
    assert nc.connected_server_version.major >= 2


def test_no_plaintext_listener(nats_server: NatsServer) -> None:
    assert nats_server.pid is not None
    assert _listening_ports(nats_server.pid) == {nats_server.settings.port}
    conf = nats_server.config_path.read_text()
    assert conf.count("listen:") == 1
    assert "verify_and_map: true" in conf
    for plaintext in ("http:", "http_port", "websocket", "leafnodes", "mqtt", "\nport:"):
        assert plaintext not in conf


def test_cluster_and_monitor_config_are_tls_only(pki: FabricPki, tmp_path: Path) -> None:
    settings = ServerSettings(
        server_name="s1",
        pki_dir=pki.dir,
        store_dir=tmp_path,
        cluster=ClusterSettings(name="c", port=6222, routes=("a:6222", "b:6222")),
        monitor_port=8222,
    )
    conf = render_server_config(settings)
    cluster = conf[conf.index("cluster {") :]
    assert "tls {" in cluster and "verify_and_map: true" in cluster
    # Only the server certificate may join as a route.
    assert 'authorization { user: "CN=agent-fabric server,O=agent-fabric" }' in cluster
    assert 'https: "127.0.0.1:8222"' in conf
    assert "http:" not in conf
    assert '"nats-route://a:6222", "nats-route://b:6222"' in conf


async def test_reload_applies_issue_and_revoke_without_restart(tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller", "view-1": "viewer"})
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        pid = server.pid
        clients = Clients(own, server.url)
        try:
            ctl_lost = asyncio.Event()
            viewer_lost = asyncio.Event()

            async def on_ctl_lost() -> None:
                ctl_lost.set()

            async def on_viewer_lost() -> None:
                viewer_lost.set()

            ctl = await clients("ctl-1", disconnected_cb=on_ctl_lost)
            await clients("view-1", disconnected_cb=on_viewer_lost)

            own.issue("viewer", "late-1")
            with pytest.raises(ConnectError, match="Authorization Violation"):
                await clients("late-1")
            await server.reload()
            late = await clients("late-1")
            await late.flush(timeout=5)

            revoke_identity(own.dir, "view-1")
            await server.reload()
            # The revoked identity's live connection is dropped, and it cannot come back.
            async with asyncio.timeout(5):
                await viewer_lost.wait()
            with pytest.raises(ConnectError, match="Authorization Violation"):
                await clients("view-1")

            # Nobody else noticed: same process, live connections untouched.
            assert server.pid == pid
            assert not ctl_lost.is_set()
            assert ctl.is_connected and late.is_connected
            sub = await late.subscribe("events.>")
            await late.flush()
            await until_delivered(lambda data: ctl.publish("events.probe", data), sub)
            await ctl.publish("events.node.lost", b"n9")
            assert (await sub.next_msg(timeout=5)).data == b"n9"
        finally:
            await clients.aclose()
    assert server.pid is None


async def test_reload_refused_config_is_reported(tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller"})
    async with NatsServer.local(own.dir, tmp_path / "state") as server:
        # Damage the main config: a reload must say so, and the server keeps running.
        server.config_path.write_text(server.config_path.read_text() + "\nbogus {\n")
        with pytest.raises(Exception, match="refused the new config"):
            await server.reload()
        assert server.running


async def test_stop_kill_and_restart_reap_by_pid(tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", {"ctl-1": "controller"})
    server = NatsServer.local(own.dir, tmp_path / "state")
    await server.start()
    first = server.pid
    assert first is not None
    await server.kill()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # reaped: not even a zombie
    await server.start()  # same config, same port
    assert server.pid not in (None, first)
    await server.stop()
    assert server.pid is None
    assert "Server is ready" in server.log_text()


# -- CLI ----------------------------------------------------------------------------


async def _read_until(stream: asyncio.StreamReader, needle: str, within: float = 15.0) -> str:
    seen = []
    async with asyncio.timeout(within):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"output ended before {needle!r}: {''.join(seen)}"
            seen.append(line)
            if needle in line:
                return "".join(seen)


async def test_cli_up_serves_reloads_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fabric",
        "nats",
        "up",
        "--state-dir",
        str(tmp_path),
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        out = await _read_until(proc.stdout, "export FABRIC_KEY=")
        server_pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
        for name, value in re.findall(r"export (FABRIC_\w+)=(\S+)", out):
            monkeypatch.setenv(name, value)
        admin = await connect()  # everything from the environment
        await admin.publish("agents.x.commands", b"{}")
        await admin.flush(timeout=5)
        await admin.close()

        # Issuing an identity while it runs is picked up without a restart.
        late = issue_identity(tmp_path / "pki", "viewer", "v2")
        await _read_until(proc.stdout, "reloaded the user list")
        nc = await connect(cert=late.cert, key=late.key)
        await nc.close()

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await proc.wait()
        assert code == 0
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_up_on_a_busy_port_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fabric",
                "nats",
                "up",
                "--state-dir",
                tmp_path,
                "--port",
                str(port),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "address already in use" in result.stderr


def test_cli_config_renders_valid_cluster_configs(
    pki: FabricPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        [
            "nats",
            "config",
            "--pki",
            str(pki.dir),
            "--cluster",
            "prod",
            "--server",
            "localhost,127.0.0.1,::1",
            "--store-dir",
            str(tmp_path / "js"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "WARNING" not in captured.out  # the test PKI's SANs cover all three hosts
    parts = re.split(r"^# ==== (.+?) ====$", captured.out, flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert len(sections) == 4
    auth = next(text for title, text in sections.items() if title.startswith("auth.conf"))
    assert f'user: "serialNumber={pki["n1"].serial},CN=n1,OU=node,O=agent-fabric"' in auth
    (tmp_path / "auth.conf").write_text(auth)
    for i, (title, text) in enumerate(sections.items()):
        if title.startswith("server"):
            conf = tmp_path / f"nats-{i}.conf"
            conf.write_text(text)
            check = subprocess.run(
                [find_nats_server(), "-t", "-c", conf], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stderr + check.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nats", "config"], "--pki DIR is required"),
        (["nats", "config", "--pki", "{pki}", "--cluster", "c"], "--cluster needs --server"),
        (["nats", "config", "--pki", "{pki}", "--server", "a,b,c"], "--server needs --cluster"),
        (["nats", "config", "--pki", "{pki}", "--port", "x"], "--port must be a port number"),
        (["nats", "up"], "--state-dir DIR is required"),
        (["nats", "up", "--state-dir", "{tmp}", "--port", "70000"], "--port must be from 0"),
    ],
)
def test_cli_bad_arguments_are_one_line(
    argv: list[str],
    message: str,
    pki: FabricPki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.format(pki=pki.dir, tmp=tmp_path) for a in argv]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
