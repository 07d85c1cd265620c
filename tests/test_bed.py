"""The fabric on a bed of three real hosts (network namespaces on a bridge).

Each host runs a member of a 3-server NATS cluster (TLS routes over the
bridge) and a node agent; hosts 1 and 2 also run a controller. The test
drives the fabric with the real CLI from inside the hosts, then cuts one
host off and watches its agent re-placed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hosts import Host, HostBed, leftovers, netns_unavailable
from natsfixtures import make_pki

pytestmark = pytest.mark.skipif(
    netns_unavailable() is not None, reason=f"no netns bed: {netns_unavailable()}"
)

ROOT = Path(__file__).resolve().parents[1]
FABRIC = [sys.executable, "-m", "fabric"]
NODE = [sys.executable, "-m", "node_agent.main"]


class Fabric:
    def __init__(self, bed: HostBed, pki_dir: Path, work: Path) -> None:
        self.bed = bed
        self.pki = pki_dir
        self.work = work
        self.urls = ",".join(f"tls://{h.address}:4222" for h in bed.hosts)

    def env(self, cert: str) -> dict[str, str]:
        return {
            **os.environ,
            "FABRIC_NATS_URL": self.urls,
            "FABRIC_CA": str(self.pki / "ca.crt"),
            "FABRIC_CERT": str(self.pki / f"{cert}.crt"),
            "FABRIC_KEY": str(self.pki / f"{cert}.key"),
            "FABRIC_TOKEN_KEY": str(self.pki / "signing.key"),
        }

    def _log(self, name: str) -> Any:
        return (self.work / f"{name}.log").open("ab")

    def start(self) -> None:
        servers = ",".join(h.address for h in self.bed.hosts)
        for host in self.bed.hosts:
            with self._log(f"nats-{host.index + 1}") as log:
                host.popen(
                    [*FABRIC, "nats", "run", "--pki", str(self.pki),
                     "--state-dir", str(self.work / f"nats-{host.index + 1}"),
                     "--name", f"nats-{host.index + 1}", "--host", host.address,
                     "--cluster", "bed", "--server", servers],
                    stdout=log, stderr=log,
                )  # fmt: skip
        for host in self.bed.hosts[:2]:
            name = f"controller-{host.index + 1}"
            with self._log(name) as log:
                host.popen(
                    [*FABRIC, "controller", "run", "--name", name, "--pki", str(self.pki)],
                    env=self.env(name), stdout=log, stderr=log,
                )  # fmt: skip
        for host in self.bed.hosts:
            with self._log(host.name) as log:
                host.popen(
                    [*NODE, "--node-id", host.name,
                     "--state-dir", str(self.work / "nodes" / host.name),
                     "--token-key", str(self.pki / "signing.pub"),
                     "--worker-cert", str(self.pki / "worker.crt"),
                     "--worker-key", str(self.pki / "worker.key")],
                    env=self.env(host.name), stdout=log, stderr=log,
                )  # fmt: skip

    def cli(self, host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return host.run([*FABRIC, *args], timeout=timeout, env=self.env("admin"))

    def json(self, host: Host, *args: str) -> Any:
        result = self.cli(host, *args, "--json")
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)


def until(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)  # wait-ok: polling CLI output under a deadline
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    work = tmp_path_factory.mktemp("bed")
    with HostBed(3) as bed:
        pki = work / "pki"
        make_pki(pki, {})
        # The bed's addresses must be in the server certificate: re-make it with them.
        subprocess.run(
            [*FABRIC, "pki", "init", "--dir", str(pki), "--force",
             *[arg for h in bed.hosts for arg in ("--host", h.address)]],
            check=True, capture_output=True,
        )  # fmt: skip
        identities = {
            "controller-1": "controller",
            "controller-2": "controller",
            "admin": "operator",
            "worker": "worker",
        }
        identities |= {h.name: "node" for h in bed.hosts}
        for name, role in identities.items():
            subprocess.run(
                [*FABRIC, "pki", "issue", "--dir", str(pki), "--role", role, name],
                check=True, capture_output=True,
            )  # fmt: skip
        fab = Fabric(bed, pki, work)
        fab.start()
        yield fab
    mine = {h.netns for h in bed.hosts} | {bed.switch}
    assert not mine & set(leftovers()), "the bed left namespaces behind"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False)
    assert bed._if not in links.stdout, "the bed left veth interfaces behind"


def _ready(fab: Fabric, host: Host) -> set[str]:
    nodes = fab.json(host, "nodes") or []
    return {n["info"]["node_id"] for n in nodes if n["state"] == "ready"}


def test_fabric_spreads_over_hosts_and_re_places_a_cut_off_host(fabric: Fabric) -> None:
    h1, h2, h3 = fabric.bed.hosts
    until(lambda: _ready(fabric, h3) == {"host-1", "host-2", "host-3"}, 60, "3 ready nodes")

    run = fabric.cli(h1, "run", "web", "--replicas", "3", "--", "sleep", "600", timeout=90)
    assert run.returncode == 0, run.stderr

    def placement(host: Host) -> dict[str, str]:
        agents = fabric.json(host, "ps") or []
        return {a["agent_id"]: a["node_id"] for a in agents if a["state"] == "running"}

    spread = until(lambda: len(placement(h2)) == 3 and placement(h2), 30, "3 running replicas")
    assert sorted(spread.values()) == ["host-1", "host-2", "host-3"]

    # A task through the queue: a worker agent on the bed, submitted from another host.
    worker = ROOT / "examples" / "summarize_worker.py"
    run = fabric.cli(
        h1, "run", "summarizer", "--capability", "summarize", "--",
        sys.executable, str(worker), timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    task = fabric.cli(
        h2, "task", "submit", "summarize", "--data", '{"text": "one two three"}', "--wait",
        timeout=90,
    )  # fmt: skip
    assert task.returncode == 0, task.stderr
    assert json.loads(task.stdout[task.stdout.index("{") :]) == {
        "words": 3,
        "summary": "one two three",
    }

    events = fabric.cli(h3, "events", "--since", "5m", "--json")
    assert events.returncode == 0, events.stderr
    kinds = {json.loads(line)["type"] for line in events.stdout.splitlines() if line.strip()}
    assert {"io.agent-fabric.agent.started", "io.agent-fabric.task.completed"} <= kinds

    moved = next(agent for agent, node in spread.items() if node == "host-3")
    fabric.bed.cut(2)
    try:

        def replaced() -> bool:
            now = placement(h1)
            return now.get(moved) in ("host-1", "host-2")

        until(replaced, 60, f"{moved} re-placed off host-3")
    finally:
        fabric.bed.heal(2)
    until(lambda: "host-3" in _ready(fabric, h1), 60, "host-3 back")


def test_a_killed_host_has_its_agent_re_placed(fabric: Fabric) -> None:
    h1, h2, h3 = fabric.bed.hosts
    until(lambda: _ready(fabric, h1) == {"host-1", "host-2", "host-3"}, 60, "3 ready nodes")
    run = fabric.cli(h1, "run", "doomed", "--replicas", "3", "--", "sleep", "600", timeout=90)
    assert run.returncode == 0, run.stderr

    def on(node: str) -> list[str]:
        agents = fabric.json(h2, "ps") or []
        return [
            a["agent_id"]
            for a in agents
            if a["agent_id"].startswith("doomed")
            and a["node_id"] == node
            and a["state"] == "running"
        ]

    victim = until(lambda: on("host-3"), 30, "a doomed replica on host-3")[0]
    fabric.bed.kill(2)  # host-3 loses power: its NATS server, node agent and agents
    until(lambda: victim in on("host-1") + on("host-2"), 60, f"{victim} re-placed")
    assert h3.pids() == []


def test_a_bed_leaves_nothing_behind(tmp_path: Path) -> None:
    with HostBed(2) as bed:
        sleeper = bed.hosts[0].popen(["sleep", "600"])
        names = [h.netns for h in bed.hosts]
        assert set(names) <= set(leftovers())
    assert sleeper.poll() is not None
    assert not set(names) & set(leftovers())
