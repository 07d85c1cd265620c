"""`fabric nats run`: the production foreground server (systemd, containers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from natsfixtures import make_pki, run_sync

from fabric.connect import connect
from fabric.nats_server import free_port


def test_run_serves_tls_and_stops_on_sigterm(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", {"op-1": "operator"})
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fabric", "nats", "run",
            "--pki", str(pki.dir), "--state-dir", str(tmp_path / "state"),
            "--name", "nats-1", "--host", "127.0.0.1", "--port", str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server accepts TLS
        assert f"tls://127.0.0.1:{port}" in line, line + (proc.stderr.read() if proc.stderr else "")

        async def round_trip() -> bool:
            nc = await connect(
                f"tls://127.0.0.1:{port}", ca=pki.ca, cert=pki["op-1"].cert, key=pki["op-1"].key
            )
            connected = nc.is_connected
            await nc.close()
            return connected

        assert run_sync(round_trip())
        assert (tmp_path / "state" / "jetstream").is_dir()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()  # closes the pipes


def test_run_without_a_pki_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric", "nats", "run", "--pki", str(tmp_path / "none"),
         "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no CA" in result.stderr
