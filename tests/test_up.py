"""`fabric up` as a user runs it: a real subprocess on a tmp state dir and a free port.

:class:`UpProcess` (also imported by the ``test_cli_*`` modules) starts
``fabric up``, waits for its "fabric is up" line, runs CLI commands as
subprocesses with the settings of the ``fabric.env`` it wrote, remembers
every pid it has seen (server, controller, nodes, agents), and at the end
stops it with SIGTERM and checks that none of those processes is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agents.harness import alive

from fabric.env import parse_env_file

T = TypeVar("T")

UP_READY = "fabric is up"
_PID_LINE = re.compile(r"^(nats-server|controller|node)\s+(\S+)\s+pid (\d+)$")


def up_argv(state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fabric", "up", "--state-dir", str(state_dir), *extra]


def until(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return lines[0]


class PipeLines:
    """Lines from a pipe that never ends by itself (``-f``), each awaited with a deadline.

    Reads the fd directly: a buffered reader could hold lines that select()
    on the fd no longer reports.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("no line from the follower in time")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError("the follower ended")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def interrupt(proc: subprocess.Popen[bytes], within: float = 15.0) -> tuple[bytes, bytes]:
    """Ctrl-C for ``proc`` (SIGINT), then its output once it ends. One that
    outlives ``within`` is killed before the test fails, so no follower is
    left running into later tests."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


class UpProcess:
    """One `fabric up` on ``state_dir``; restartable; every pid it ever ran is kept."""

    def __init__(self, state_dir: Path, nodes: int = 1) -> None:
        self.state_dir = state_dir
        self.nodes = nodes
        self.proc: subprocess.Popen[str] | None = None
        self.pids: dict[str, int] = {}
        self.seen_pids: set[int] = set()
        self.runs = 0

    @property
    def out_path(self) -> Path:
        return self.state_dir.parent / f"up-{self.runs}.out"

    def output(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    def start(self, timeout: float = 45.0) -> None:
        self.runs += 1
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.out_path.open("w") as out:
            self.proc = subprocess.Popen(
                up_argv(self.state_dir, "--nodes", str(self.nodes), "--port", "0"),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=_clean_env(),
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"fabric up exited {self.proc.returncode}: {self.output()}")
            return UP_READY in self.output()

        until("fabric up", ready, timeout)
        self.pids = {}
        for line in self.output().splitlines():
            match = _PID_LINE.match(line)
            if match:
                self.pids[match.group(2) if match.group(1) == "node" else match.group(1)] = int(
                    match.group(3)
                )
        self.seen_pids |= set(self.pids.values())

    def env(self) -> dict[str, str]:
        values = parse_env_file((self.state_dir / "fabric.env").read_text())
        return {**_clean_env(), **values}

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `fabric ARGS` from a directory that has no .fabric of its own."""
        return subprocess.run(
            [sys.executable, "-m", "fabric", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.state_dir.parent,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, timeout: float = 60.0) -> str:
        result = self.cli(*args, timeout=timeout)
        assert result.returncode == 0, f"fabric {' '.join(args)}: {result.stderr}{result.stdout}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def agents(self) -> dict[str, dict[str, Any]]:
        """`fabric ps -a --json` by agent id; every pid in it is remembered."""
        listing = self.json("ps", "-a")
        self.seen_pids |= {a["pid"] for a in listing if a.get("pid")}
        return {a["agent_id"]: a for a in listing}

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def assert_all_gone(self) -> None:
        left = until(
            "every process of the fabric to exit",
            lambda: not [p for p in self.seen_pids if alive(p)] or None,
            timeout=15.0,
        )
        assert left


def _clean_env() -> dict[str, str]:
    # The test's own FABRIC_* (a developer's sourced env) must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}


def module_fabric(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> Iterator[UpProcess]:
    """Body of a module-scoped fixture: one fabric for the module, checked at the end."""
    fabric = UpProcess(tmp_path_factory.mktemp("up") / "state", nodes=nodes)
    fabric.start()
    try:
        yield fabric
    finally:
        if fabric.proc is not None:
            with contextlib.suppress(AssertionError):
                fabric.agents()  # remember the agents' pids before stopping
            code = fabric.stop()
            assert code == 0, fabric.output()
        fabric.assert_all_gone()


# --- the module's own fabric: three nodes -----------------------------------------


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=3)


def test_three_nodes_come_up_ready(fabric: UpProcess) -> None:
    nodes = fabric.json("nodes")
    assert sorted(n["info"]["node_id"] for n in nodes) == ["local-1", "local-2", "local-3"]
    assert {n["state"] for n in nodes} == {"ready"}
    # The pids registered are the node agents `fabric up` started.
    assert {n["info"]["node_id"]: n["info"]["pid"] for n in nodes} == {
        k: v for k, v in fabric.pids.items() if k.startswith("local-")
    }
    assert all(n["metrics"] is not None and n["last_heartbeat"] for n in nodes)


def test_env_file_is_sourceable_and_complete(fabric: UpProcess) -> None:
    env_file = fabric.state_dir / "fabric.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = parse_env_file(env_file.read_text())
    pki = fabric.state_dir / "pki"
    assert values["FABRIC_NATS_URL"].startswith("tls://127.0.0.1:")
    assert values["FABRIC_CA"] == str(pki / "ca.crt")
    assert values["FABRIC_CERT"] == str(pki / "admin.crt")
    assert values["FABRIC_KEY"] == str(pki / "admin.key")
    assert values["FABRIC_TOKEN_KEY"] == str(pki / "signing.key")
    assert values["FABRIC_STATE_DIR"] == str(fabric.state_dir)
    shell = subprocess.run(
        ["sh", "-c", f'. "{env_file}" && printf %s "$FABRIC_NATS_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == values["FABRIC_NATS_URL"]


def test_identities_are_issued(fabric: UpProcess) -> None:
    inventory = json.loads((fabric.state_dir / "pki" / "inventory.json").read_text())
    roles = {e["name"]: e["role"] for e in inventory}
    assert roles == {
        "controller-1": "controller",
        "admin": "operator",
        "viewer": "viewer",
        "worker": "worker",
        "local-1": "node",
        "local-2": "node",
        "local-3": "node",
    }


def test_second_up_on_the_same_state_dir_is_refused(fabric: UpProcess) -> None:
    result = subprocess.run(
        up_argv(fabric.state_dir, "--port", "0"),
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "already up" in one_line(result.stderr)


def test_stopped_fabric_then_a_second_up_brings_the_deployment_back(fabric: UpProcess) -> None:
    fabric.ok("run", "web", "--", sys.executable, "-m", "http.server", "0")
    first = fabric.agents()["web"]
    assert first["state"] == "running"

    assert fabric.stop() == 0
    assert "stopped" in fabric.output().splitlines()[-1]
    fabric.assert_all_gone()

    stopped = fabric.cli("ps")
    assert stopped.returncode == 1
    assert "is `fabric up` running?" in one_line(stopped.stderr)

    fabric.start()
    back = until(
        "web running again",
        lambda: (a := fabric.agents().get("web")) and a["state"] == "running" and a,
    )
    assert back["pid"] != first["pid"]
    assert "issued" not in fabric.output() and "new PKI" not in fabric.output()


# --- failures while starting: one line, nothing left behind -----------------------


def test_busy_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            up_argv(tmp_path / "s", "--port", str(port)),
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"port {port}" in one_line(result.stderr)


def test_a_node_failing_to_start_stops_what_was_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "nodes").mkdir(parents=True)
    # A file where the node's state directory should be: the node agent dies.
    (state / "nodes" / "local-1").write_text("in the way")
    out = tmp_path / "up.out"
    with out.open("w") as fh:
        result = subprocess.run(
            up_argv(state, "--port", "0"),
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "local-1" in line and "while starting" in line
    started = [int(m.group(3)) for m in map(_PID_LINE.match, out.read_text().splitlines()) if m]
    assert len(started) == 2  # server and controller
    assert not [pid for pid in started if alive(pid)]
    assert not (state / "fabric.env").exists()


def test_bad_flag_is_exit_2_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric", "up", "--nodes", "many"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        check=False,
    )
    assert result.returncode == 2
    assert "--nodes" in one_line(result.stderr)
