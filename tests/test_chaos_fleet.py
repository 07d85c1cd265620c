"""Issue 8's fleet scenarios in short form: one run each of bench/chaos/fleet.py.

kill -9 of a node agent then its restart (every agent re-adopted, same pids,
history kept), kill -9 of a whole host and a network cut then heal on the
netns bed, with every process of the machine sampled throughout: the script
exits 1 when anything was lost, a replica ran twice after the fault (a cut:
once the healed host stopped its stale copies), an ``on_partition: stop``
singleton ever ran twice, or a status history was reset. The long form and
its figures: bench/README.md, "Fleet chaos".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hosts import netns_unavailable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "chaos" / "fleet.py"


@pytest.mark.timeout(600)
def test_one_run_of_each_fleet_fault_loses_nothing_and_runs_nothing_twice() -> None:
    scenarios = "readopt" if netns_unavailable() is not None else "readopt,host-kill,cut"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "1", "--only", scenarios],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.split("\n\n")
    rows = [line for part in summary for line in part.splitlines() if line.startswith("| ")]
    for name in scenarios.split(","):
        assert any(row.startswith(f"| {name} ") for row in rows), done.stdout
    assert "namespaces left behind" not in done.stdout
