"""`fabric pki` and `fabric token`: exit codes, one-line errors, what lands on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fabric
from fabric.cli import main
from fabric.tokens import TokenVerifier

REPO = Path(fabric.__file__).resolve().parent.parent


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(directory), "--host", "10.9.9.9"]) == 0
    return directory


def _one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fabric: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_init_issue_revoke_list(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["pki", "issue", "--dir", str(pki_dir), "--role", "node", "node-1"]) == 0
    issued = capsys.readouterr().out
    assert main(["pki", "issue", "--dir", str(pki_dir), "--role", "viewer", "bob"]) == 0
    assert main(["pki", "revoke", "--dir", str(pki_dir), "node-1"]) == 0
    capsys.readouterr()

    assert main(["pki", "list", "--dir", str(pki_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert main(["pki", "list", "--dir", str(pki_dir)]) == 0
    table = capsys.readouterr().out.splitlines()

    node_serial = listed[0]["serial"]
    assert issued.strip() == (
        f"wrote {pki_dir / 'node-1.crt'} and {pki_dir / 'node-1.key'}"
        f" (serialNumber={node_serial},CN=node-1,OU=node,O=agent-fabric)"
    )
    assert [(e["name"], e["role"], e["revoked"]) for e in listed] == [
        ("node-1", "node", True),
        ("bob", "viewer", False),
    ]
    assert table[0].split() == ["NAME", "ROLE", "NOT", "AFTER", "STATUS", "SERIAL"]
    assert table[1].split()[:2] == ["node-1", "node"]
    assert "revoked" in table[1]
    assert "active" in table[2]

    # Issued again: the new certificate is active, the revoked one listed as replaced.
    assert main(["pki", "issue", "--dir", str(pki_dir), "--role", "node", "node-1", "--force"]) == 0
    capsys.readouterr()
    assert main(["pki", "list", "--dir", str(pki_dir)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[-2]) for r in rows] == [
        ("bob", "active"),
        ("node-1", "active"),
        ("node-1", "replaced"),
    ]
    assert rows[2][-1] == node_serial


def test_init_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pki", "init", "--dir", str(tmp_path / "p"), "--days", "30"])

    out = capsys.readouterr().out
    assert code == 0
    assert out == f"wrote CA, server certificate and token signing key to {tmp_path / 'p'}\n"
    assert {p.name for p in (tmp_path / "p").iterdir()} >= {"ca.crt", "server.key", "signing.pub"}


def test_token_issue_verifies(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    argv = ["token", "issue", "--dir", str(pki_dir), "--subject", "alice"]
    argv += ["--scope", "agents:run", "--scope", "read", "--agent", "web-1", "--ttl", "120"]

    assert main(argv) == 0

    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier.from_files(pki_dir / "signing.pub")
    claims = verifier.verify(token, scope="agents:run", agent="web-1")
    assert (claims.sub, claims.agent, claims.exp - claims.iat) == ("alice", "web-1", 120)


def test_token_issue_with_key_path(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    key = str(pki_dir / "signing.key")

    assert main(["token", "issue", "--key", key, "--subject", "ops", "--scope", "read"]) == 0

    claims = TokenVerifier.from_files(pki_dir / "signing.pub").verify(
        capsys.readouterr().out.strip(), scope="read"
    )
    assert claims.exp - claims.iat == 300


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["pki", "issue", "--role", "admin", "x1"], "unknown role 'admin'"),
        (["pki", "issue", "--role", "node", "Bad.Name"], "bad identity name"),
        (["pki", "issue", "--role", "node", "ca"], "reserved"),
        (["pki", "issue", "--role", "node", "--days", "soon", "x1"], "--days"),
        (["pki", "issue", "--role", "node", "--days", "0", "x1"], "days"),
        (["pki", "init"], "already exists: use --force"),
        (["pki", "revoke", "ghost"], "no identity named 'ghost'"),
        (["token", "issue", "--subject", "a", "--scope", "root"], "unknown scope 'root'"),
        (["token", "issue", "--subject", "a", "--scope", "read", "--ttl", "0"], "--ttl"),
        (["token", "issue", "--subject", "a", "--scope", "read", "--ttl", "x"], "--ttl"),
        (["token", "issue", "--subject", "a", "--scope", "read", "--agent", "A!"], "agent"),
    ],
)
def test_bad_arguments_exit_2(
    pki_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    capsys.readouterr()
    full = [*argv[:2], "--dir", str(pki_dir), *argv[2:]]

    code = main(full)

    captured = capsys.readouterr()
    assert code == 2
    assert needle in _one_line_error(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["pki", "issue", "--role", "node", "n1"],
        ["pki", "list"],
        ["pki", "revoke", "n1"],
    ],
)
def test_missing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    empty = tmp_path / "empty"

    code = main([*argv[:2], "--dir", str(empty), *argv[2:]])

    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert line == f"fabric: error: no CA in {empty}: run `fabric pki init --dir {empty}` first"


def test_token_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "issue", "--subject", "a", "--scope", "read"]) == 2
    assert "--key" in _one_line_error(capsys.readouterr().err)
    argv = ["token", "issue", "--dir", str(tmp_path), "--subject", "a", "--scope", "read"]
    assert main(argv) == 2
    assert "no signing key" in _one_line_error(capsys.readouterr().err)


def test_token_with_wrong_key_type(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    for key in ("ca.key", "ca.crt"):
        argv = ["token", "issue", "--key", str(pki_dir / key), "--subject", "a", "--scope", "read"]
        assert main(argv) == 2
        assert "bad signing key" in _one_line_error(capsys.readouterr().err)


def test_force_overwrites(pki_dir: Path) -> None:
    old = (pki_dir / "ca.crt").read_bytes()

    assert main(["pki", "init", "--dir", str(pki_dir), "--force"]) == 0

    assert (pki_dir / "ca.crt").read_bytes() != old


def test_as_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "fabric", "pki", "init", "--dir", str(tmp_path / "p")]

    first = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)

    assert (first.returncode, first.stderr) == (0, "")
    assert "wrote CA" in first.stdout
    assert again.returncode == 2
    assert "ca.crt already exists: use --force" in _one_line_error(again.stderr)
