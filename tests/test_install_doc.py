"""deploy/install.md, followed as far as pip and files go, on the netns bed.

The commands of step 1 run as written (the venv and the package install are
pointed at this checkout), inside a bed host; the files step 2 says to copy
exist for every host; step 4's unit rendering runs with the venv and the
units pass `systemd-analyze verify`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hosts import HostBed, netns_unavailable

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "deploy" / "install.md").read_text()

pytestmark = pytest.mark.skipif(
    netns_unavailable() is not None, reason=f"no netns bed: {netns_unavailable()}"
)


def _section(number: int) -> str:
    return DOC.split(f"## {number}.", 1)[1].split("\n## ", 1)[0]


def _sh_block(number: int) -> str:
    return re.search(r"```sh\n(.*?)```", _section(number), flags=re.S).group(1)  # type: ignore[union-attr]


def test_install_doc_on_the_bed(tmp_path: Path) -> None:
    venv = tmp_path / "fabric-admin"
    # pip needs the package index; bed hosts have no route out by design, so
    # the venv is made here and used inside the host.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(ROOT)],
        check=True,
        capture_output=True,
    )
    step1 = _sh_block(1)
    step1 = step1.replace("python3 -m venv ~/fabric-admin && ", "")
    step1 = step1.replace("~/fabric-admin", str(venv))
    step1 = re.sub(r"^pip install .*$", "", step1, flags=re.M)
    admin = tmp_path / "admin"
    admin.mkdir()
    with HostBed(1) as bed:
        done = bed.hosts[0].run(["bash", "-euo", "pipefail", "-c", step1], cwd=admin)
        assert done.returncode == 0, done.stderr
        assert "host-3" in done.stdout  # `fabric pki list` at the end of the block

        pki = admin / "pki"
        table = _section(2).split("| file | why |", 1)[1].split("\n\n", 1)[0]
        cells = re.findall(r"^\| ([^|]+) \|", table, flags=re.M)
        files = [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]
        assert {"ca.crt", "<host>.crt", "<host>.key"} <= set(files)
        for host in ("host-1", "host-2", "host-3"):
            target = tmp_path / host / "etc" / "agent-fabric" / "pki"
            target.mkdir(parents=True)
            for name in files:
                name = name.replace("<host>", host)
                shutil.copy2(pki / name, target / name)
            assert (target / f"{host}.key").stat().st_mode & 0o077 == 0

        out = tmp_path / "units"
        render = bed.hosts[0].run(
            [str(venv / "bin" / "python"), "-m", "fabric.deploy_units",
             "--bin", str(venv / "bin"), "--etc", str(tmp_path / "host-1" / "etc" / "agent-fabric"),
             "--state", str(tmp_path / "state"), "--out", str(out)],
            cwd=ROOT,
        )  # fmt: skip
        assert render.returncode == 0, render.stderr
    units = sorted(out.glob("*.service"))
    assert len(units) == 3
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *map(str, units)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stderr
        assert not [line for line in verify.stderr.splitlines() if ".service:" in line]
