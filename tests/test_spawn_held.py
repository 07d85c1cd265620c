"""The held spawn (node_agent.spawn): vfork + /bin/sh waiting on its stdin, released
once the agent's cgroup and rlimits are in place. The program must see exactly what
a direct exec would give it."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent import spawn as spawn_module
from schemas.agent import AgentSpec

PRINT_ENV = [
    sys.executable,
    "-c",
    "import os; print(sorted(os.environ.items())); "
    "print(open('/proc/self/cmdline').read().split(chr(0))[0]); "
    "print(os.readlink('/proc/self/fd/0')); print(os.getcwd()); "
    "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))",
]


def run(spec: AgentSpec, tmp_path: Path, **kw: object) -> list[str]:
    out = tmp_path / "out"
    with out.open("wb") as f:
        popen = spawn_module.spawn(spec, stdout=f.fileno(), stderr=f.fileno(), **kw)  # type: ignore[arg-type]
    assert popen.wait(10) == 0
    return out.read_text().splitlines()


@pytest.mark.parametrize(
    "env", [{}, {"PWD": "/not/where/we/are", "SHLVL": "7"}, {"PATH": "/usr/bin:/bin"}]
)
def test_held_program_sees_what_a_direct_exec_gives(tmp_path: Path, env: dict[str, str]) -> None:
    spec = AgentSpec(name="e", argv=PRINT_ENV, env=env, clean_env=True, cwd=str(tmp_path))
    limit = (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    held = run(spec, tmp_path, rlimits=[(resource.RLIMIT_NOFILE, *limit)])
    direct = subprocess.run(
        PRINT_ENV,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert held[:4] == direct[:4]
    assert held[1] == sys.executable
    assert held[2] == "/dev/null"
    assert held[4] == str(limit)


def test_missing_program_is_an_oserror_before_anything_runs(tmp_path: Path) -> None:
    limits = [(resource.RLIMIT_NOFILE, 100, 100)]
    with pytest.raises(FileNotFoundError):
        run(AgentSpec(name="m", argv=["no-such-program-here"]), tmp_path, rlimits=limits)
    with pytest.raises(FileNotFoundError):
        spec = AgentSpec(name="c", argv=["true"], cwd=str(tmp_path / "missing"))
        run(spec, tmp_path, rlimits=limits)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        run(AgentSpec(name="x", argv=[str(script)]), tmp_path, rlimits=limits)


def test_odd_environment_names_fall_back_to_the_fork(tmp_path: Path) -> None:
    spec = AgentSpec(name="o", argv=PRINT_ENV, env={"A-B": "1"}, clean_env=True)
    held = run(spec, tmp_path, rlimits=[(resource.RLIMIT_NOFILE, 100, 100)])
    assert "('A-B', '1')" in held[0]


def test_released_only_after_the_cgroup_join(tmp_path: Path) -> None:
    from node_agent.cgroup import CgroupTree

    tree = CgroupTree.detect(name=f"fabric-test-held-{os.getpid()}")
    if tree is None:
        pytest.skip("no writable cgroup v2 subtree on this host")
    cg = tree.agent("held")
    try:
        spec = AgentSpec(name="held", argv=["cat", "/proc/self/cgroup"])
        lines = run(spec, tmp_path, cgroup_procs=cg.procs_file)
        assert any(line.startswith("0::") and line.endswith("/held") for line in lines)
    finally:
        cg.path.rmdir()
        tree.remove_base()
