"""The systemd units, rendered against real paths, pass `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.deploy_units import UNIT_NAMES, render_unit, render_units

BIN = Path(sys.executable).parent


@pytest.fixture
def rendered(tmp_path: Path) -> list[Path]:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "fabric.env").write_text("FABRIC_CONTROLLER_NAME=controller-1\n")
    state = tmp_path / "state"
    (state / "nats").mkdir(parents=True)
    (state / "node").mkdir(parents=True)
    return render_units(tmp_path / "units", bin_dir=BIN, etc_dir=etc, state_dir=state)


def test_every_binary_the_units_start_exists() -> None:
    for name in ("fabric", "fabric-node", "nats-server"):
        assert (BIN / name).exists(), f"{name} not in {BIN}: install the package first"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_verify_is_clean(rendered: list[Path]) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, rendered)],
        capture_output=True,
        text=True,
        check=False,
    )
    # Complaints about units other than ours (the host's own) are not ours to fix.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(name in line for name in UNIT_NAMES)
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], "\n".join(ours)


def test_node_unit_is_notify_with_watchdog_and_delegation(rendered: list[Path]) -> None:
    node = next(p for p in rendered if p.name == "fabric-node.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Delegate=yes", "KillMode=process"):
        assert line in node


def test_no_placeholder_survives_rendering(rendered: list[Path]) -> None:
    for path in rendered:
        assert "@" not in path.read_text().replace("@BIN@", ""), path.name


@pytest.mark.parametrize("bad", [Path("relative/bin"), Path("/opt/with space"), Path("/opt/%n")])
def test_bad_paths_are_refused(bad: Path) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        render_unit("ExecStart=@BIN@/fabric", bin_dir=bad, etc_dir=Path("/e"), state_dir=Path("/s"))
