"""Spec abuse: what a spec may ask of a node, checked by a live node agent and controller.

* argv with shell metacharacters reaches the program as plain arguments: no
  shell ever sees it unless the spec says ``shell: true`` (one string, the
  documented opt-in).
* env may not set the fabric's own ``FABRIC_*`` variables (``spec_env_reserved``).
* cwd must be absolute and normalised, and under the node's cwd root when it
  has one, symlinks resolved (``spec_cwd_forbidden``); log files are named by
  the agent id only, and a path-like id is refused by the decoder.
* user/group root (uid or gid 0) is refused unless the node allows root
  agents (``spec_root_forbidden``), and an exec health check runs as the
  agent's user, not as the node agent.

Every refusal is a coded ErrorReply, counted by the node or controller,
audited as ``events.node.refused`` / ``events.controller.refused`` naming
the verified operator, and nothing is placed, logged or spawned.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleetfixtures import controller_config, running
from natsfixtures import Clients, FabricPki
from test_security_rig import Events, node_config, running_node

import fabric
from fabric.audit import AUDITED_CODES
from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.spec_policy import NodeSpecPolicy, check_on_node, check_spec
from fabric.tasks.batch import parse_payload
from fabric.tokens import TokenIssuer
from node_agent.service import NodeAgent
from node_agent.spawn import build_env
from schemas import subjects
from schemas.agent import (
    AgentSpec,
    AgentState,
    HealthVerdict,
    RestartPolicy,
    RestartPolicyKind,
)
from schemas.api import ApiResult
from schemas.codec import decode, decode_reply, encode
from schemas.command import StatusAgent
from schemas.errors import ContractError, ErrorCode, ErrorReply

REPO = Path(fabric.__file__).resolve().parents[1]
SPEC_CODES = (
    ErrorCode.SPEC_ENV_RESERVED,
    ErrorCode.SPEC_CWD_FORBIDDEN,
    ErrorCode.SPEC_ROOT_FORBIDDEN,
)
# Shell syntax that would run a command if anything handed argv to a shell.
METACHARACTERS = [
    "; touch semicolon",
    "$(touch dollar)",
    "`touch backtick`",
    "| touch pipe",
    "&& touch and",
    "> redirected",
    "*",
    "a\ntouch newline",
    "'quoted' \"double\" \\",
]
# Prints its arguments as JSON, so the test sees exactly what the program got.
ECHO_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]), flush=True)"


def _spec(name: str, **fields: Any) -> dict[str, Any]:
    """A spec as JSON-ready data: the wire is where abuse arrives."""
    return {"name": name, "argv": [sys.executable, "-c", "import time; time.sleep(60)"], **fields}


# --- the rules, no NATS -----------------------------------------------------------


def test_the_rules_hold_without_a_node() -> None:
    def refused(spec: AgentSpec, policy: NodeSpecPolicy | None = None) -> ErrorCode:
        with pytest.raises(ContractError) as info:
            if policy is None:
                check_spec(spec)
            else:
                check_on_node(spec, policy, uid_of=uids.__getitem__, gid_of=gids.__getitem__)
        return info.value.code

    uids = {"toor": 0, "app": 1000}
    gids = {"wheel0": 0, "app": 1000}
    argv = ["true"]
    ok = AgentSpec(name="a", argv=argv, env={"fabric_lower": "x", "MY_FABRIC_X": "y"}, cwd="/srv")
    check_spec(ok)
    check_on_node(ok, NodeSpecPolicy(cwd_root=Path("/srv")))
    check_on_node(
        AgentSpec(name="a", argv=argv, user="app", group="app"),
        NodeSpecPolicy(),
        uid_of=uids.__getitem__,
        gid_of=gids.__getitem__,
    )
    for key in ("FABRIC_AGENT_ID", "FABRIC_NATS_URL", "FABRIC_CERT", "FABRIC_ANYTHING"):
        spec = AgentSpec(name="a", argv=argv, env={key: "x"})
        assert refused(spec) is ErrorCode.SPEC_ENV_RESERVED, key
    for cwd in ("srv", "./srv", "/srv/../etc", "/srv/.", "//srv", "/srv//x", "/srv/x/", "/a\0b"):
        assert refused(AgentSpec(name="a", argv=argv, cwd=cwd)) is ErrorCode.SPEC_CWD_FORBIDDEN
    assert refused(
        AgentSpec(name="a", argv=argv, cwd="/srvx"), NodeSpecPolicy(cwd_root=Path("/srv"))
    ) is (ErrorCode.SPEC_CWD_FORBIDDEN)
    assert refused(AgentSpec(name="a", argv=argv, user="root")) is ErrorCode.SPEC_ROOT_FORBIDDEN
    assert refused(AgentSpec(name="a", argv=argv, group="root")) is ErrorCode.SPEC_ROOT_FORBIDDEN
    # Another name for uid 0 is only known on the node.
    check_spec(AgentSpec(name="a", argv=argv, user="toor"))
    toor = AgentSpec(name="a", argv=argv, user="toor")
    assert refused(toor, NodeSpecPolicy()) is ErrorCode.SPEC_ROOT_FORBIDDEN
    wheel = AgentSpec(name="a", argv=argv, group="wheel0")
    assert refused(wheel, NodeSpecPolicy()) is ErrorCode.SPEC_ROOT_FORBIDDEN
    check_on_node(toor, NodeSpecPolicy(allow_root_agents=True), uid_of=uids.__getitem__)
    check_spec(AgentSpec(name="a", argv=argv, user="root"), allow_root_agents=True)
    # Refusals of spec abuse are audited like token abuse.
    assert set(SPEC_CODES) <= AUDITED_CODES


def test_the_fabric_variables_win_at_spawn_as_well() -> None:
    """Defence in depth behind the refusal: a spec that got past it anyway
    (an old node's state) still cannot change what the node agent sets."""
    spec = AgentSpec(name="a", argv=["true"], env={"FABRIC_AGENT_ID": "b", "OTHER": "kept"})
    env = build_env(spec, {"FABRIC_AGENT_ID": "a"})
    assert (env["FABRIC_AGENT_ID"], env["OTHER"]) == ("a", "kept")


def test_the_node_own_fabric_settings_are_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node's certificate and key paths reach it through FABRIC_* env: an
    # agent that inherited them could connect as the node.
    monkeypatch.setenv("FABRIC_CERT", "/etc/fabric/node-1.crt")
    monkeypatch.setenv("FABRIC_KEY", "/etc/fabric/node-1.key")
    monkeypatch.setenv("HOME_OF_TEST", "kept")
    env = build_env(AgentSpec(name="a", argv=["true"]), {"FABRIC_AGENT_ID": "a"})
    assert "FABRIC_CERT" not in env and "FABRIC_KEY" not in env
    assert (env["FABRIC_AGENT_ID"], env["HOME_OF_TEST"]) == ("a", "kept")


# --- a live node -------------------------------------------------------------------


@pytest.fixture
def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", issuer="tests")


@pytest.fixture
def cwd_root(tmp_path: Path) -> Path:
    root = tmp_path / "agents"
    (root / "work").mkdir(parents=True)
    (root / "out-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    return root


@pytest.fixture
async def node(
    pki: FabricPki, nats_server: NatsServer, tmp_path: Path, cwd_root: Path
) -> AsyncIterator[NodeAgent]:
    config = node_config(pki, nats_server.url, tmp_path / "node", agent_cwd_root=cwd_root)
    assert not config.allow_root_agents  # the default
    async with running_node(config) as agent:
        yield agent


async def _place(op: Any, issuer: TokenIssuer, spec: dict[str, Any]) -> Any:
    body = encode({"op": "place", "spec": spec, "token": issuer.mint("op-1", ["agents:run"])})
    msg = await op.request(subjects.node_commands("n1"), body, timeout=10)
    return decode_reply(msg.data)


async def _status_until(
    op: Any, issuer: TokenIssuer, agent_id: str, states: set[AgentState]
) -> Any:
    """Ask the node for the agent's status until it is in ``states`` (10 s at most)."""
    async with asyncio.timeout(10):
        while True:
            token = issuer.mint("op-1", ["read"])
            msg = await op.request(
                subjects.agent_commands(agent_id), encode(StatusAgent(token=token)), timeout=5
            )
            reply = decode_reply(msg.data)
            assert not isinstance(reply, ErrorReply), reply
            if reply.status.state in states:
                return reply.status
            await asyncio.sleep(0.05)  # wait-ok: polled under a deadline


async def test_argv_metacharacters_reach_the_program_as_plain_arguments(
    node: NodeAgent, connect_as: Clients, issuer: TokenIssuer, cwd_root: Path, tmp_path: Path
) -> None:
    op = await connect_as("op-1")
    work = cwd_root / "work"
    never = RestartPolicy(policy=RestartPolicyKind.NEVER)
    spec = _spec(
        "meta",
        argv=[sys.executable, "-c", ECHO_ARGV, *METACHARACTERS],
        cwd=str(work),
        start_seconds=0,
        restart=msgspec.to_builtins(never),
    )
    placed = await _place(op, issuer, spec)
    assert not isinstance(placed, ErrorReply), placed
    status = await _status_until(op, issuer, "meta", {AgentState.EXITED, AgentState.FAILED})
    assert (status.state, status.exit_code) == (AgentState.EXITED, 0)
    stdout = (tmp_path / "node" / "logs" / "meta" / "stdout.log").read_text()
    assert json.loads(stdout.splitlines()[-1]) == METACHARACTERS
    # Nothing any shell would have made exists, where the program ran or anywhere near.
    for where in (work, cwd_root, tmp_path, tmp_path / "node"):
        made = {p.name for p in where.iterdir()}
        assert not made & {
            "semicolon",
            "dollar",
            "backtick",
            "pipe",
            "and",
            "redirected",
            "newline",
        }

    # The opt-in: shell=true runs its one string with /bin/sh -c, as documented.
    shell = _spec(
        "shell-on",
        argv=["echo ran > shell-made"],
        shell=True,
        cwd=str(work),
        start_seconds=0,
        restart=msgspec.to_builtins(never),
    )
    assert not isinstance(await _place(op, issuer, shell), ErrorReply)
    status = await _status_until(op, issuer, "shell-on", {AgentState.EXITED, AgentState.FAILED})
    assert (status.state, status.exit_code) == (AgentState.EXITED, 0)
    assert (work / "shell-made").read_text() == "ran\n"
    # And it cannot smuggle extra arguments past the one string.
    two = _spec("shell-two", argv=["echo", "x; touch y"], shell=True)
    reply = await _place(op, issuer, two)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INVALID_PAYLOAD


async def test_an_exec_health_check_runs_as_the_agent_not_as_the_node(
    node: NodeAgent, connect_as: Clients, issuer: TokenIssuer
) -> None:
    """A spec for an unprivileged user must not get the node's identity (root
    under systemd) through its health check: the check is healthy only when
    it runs with the agent's uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start an agent as another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    op = await connect_as("op-1")
    check = {"type": "exec", "argv": ["sh", "-c", f'test "$(id -u)" = {nobody}']}
    spec = _spec(
        "checked",
        argv=["sleep", "60"],
        user="nobody",
        start_seconds=0,
        health={"check": check, "interval": 0.1, "failure_threshold": 1},
    )
    assert not isinstance(await _place(op, issuer, spec), ErrorReply)
    async with asyncio.timeout(10):
        while True:
            token = issuer.mint("op-1", ["read"])
            msg = await op.request(
                subjects.agent_commands("checked"), encode(StatusAgent(token=token)), timeout=5
            )
            reply = decode_reply(msg.data)
            assert not isinstance(reply, ErrorReply), reply
            if reply.status.health is not HealthVerdict.UNKNOWN:
                break
            await asyncio.sleep(0.05)  # wait-ok: polled under a deadline
    assert reply.status.health is HealthVerdict.HEALTHY, reply.status.message


def _abuses(cwd_root: Path, tmp_path: Path) -> list[tuple[str, dict[str, Any], ErrorCode]]:
    marker = tmp_path / "spawned"
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    env = ErrorCode.SPEC_ENV_RESERVED
    cwd = ErrorCode.SPEC_CWD_FORBIDDEN
    root = ErrorCode.SPEC_ROOT_FORBIDDEN
    return [
        ("env-agent-id", _spec("env-agent-id", argv=touch, env={"FABRIC_AGENT_ID": "x"}), env),
        (
            "env-nats-url",
            _spec("env-nats-url", argv=touch, env={"FABRIC_NATS_URL": "tls://e"}),
            env,
        ),
        ("env-cert", _spec("env-cert", argv=touch, env={"FABRIC_CERT": "/stolen.crt"}), env),
        ("cwd-relative", _spec("cwd-relative", argv=touch, cwd="work"), cwd),
        ("cwd-dotdot", _spec("cwd-dotdot", argv=touch, cwd=f"{cwd_root}/../elsewhere"), cwd),
        ("cwd-outside", _spec("cwd-outside", argv=touch, cwd=str(tmp_path)), cwd),
        ("cwd-symlink", _spec("cwd-symlink", argv=touch, cwd=str(cwd_root / "out-link")), cwd),
        ("cwd-nul", _spec("cwd-nul", argv=touch, cwd=f"{cwd_root}/work\0/x"), cwd),
        ("user-root", _spec("user-root", argv=touch, user="root"), root),
        ("group-root", _spec("group-root", argv=touch, group="root"), root),
    ]


async def test_node_refuses_counts_and_audits_every_spec_abuse(
    node: NodeAgent,
    connect_as: Clients,
    issuer: TokenIssuer,
    cwd_root: Path,
    tmp_path: Path,
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.node.refused")
    handler = node._handler
    supervisor = node._supervisor
    assert handler is not None and supervisor is not None
    before = {code: handler.refused[code] for code in SPEC_CODES}
    abuses = _abuses(cwd_root, tmp_path)
    for label, spec, code in abuses:
        reply = await _place(op, issuer, spec)
        assert isinstance(reply, ErrorReply), label
        assert reply.code is code, (label, reply)
        event = await events.wait(lambda e, name=spec["name"]: e.data["target"] == name)
        assert event.data["code"] == code.value, label
        assert event.data["op"] == "place", label
        assert event.data["subject"] == subjects.node_commands("n1"), label
        # The token was good: the audit names who tried, as a fact.
        assert (event.data["claimed_by"], event.data["verified"]) == ("op-1", True), label
        assert event.actor == "op-1", label
    for code in SPEC_CODES:
        expected = sum(1 for _, _, c in abuses if c is code)
        assert handler.refused[code] - before[code] == expected, code
    # Nothing was placed, logged or spawned.
    names = {spec["name"] for _, spec, _ in abuses}
    assert not names & {s.agent_id for s in supervisor.statuses()}
    logs = tmp_path / "node" / "logs"
    assert not names & {p.name for p in logs.glob("*")}
    assert not (tmp_path / "spawned").exists()
    assert not any((tmp_path / "elsewhere").iterdir())


async def test_a_path_like_agent_id_never_becomes_a_log_path(
    node: NodeAgent, connect_as: Clients, issuer: TokenIssuer, tmp_path: Path
) -> None:
    op = await connect_as("op-1")
    handler = node._handler
    assert handler is not None
    before = handler.refused[ErrorCode.INVALID_PAYLOAD]
    for name in ("../../escape", "a/b", "..", "x.y", "*", ">"):
        reply = await _place(op, issuer, _spec(name))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INVALID_PAYLOAD, name
    assert handler.refused[ErrorCode.INVALID_PAYLOAD] - before == 6
    assert not (tmp_path / "escape").exists()
    assert not list((tmp_path / "node").rglob("escape"))


async def test_a_node_that_allows_root_agents_runs_one(
    pki: FabricPki,
    nats_server: NatsServer,
    connect_as: Clients,
    issuer: TokenIssuer,
    tmp_path: Path,
) -> None:
    """The setting is what decides: the same spec a default node refuses runs here."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start an agent as root")
    config = node_config(pki, nats_server.url, tmp_path / "node", allow_root_agents=True)
    async with running_node(config):
        op = await connect_as("op-1")
        spec = _spec(
            "as-root",
            argv=[sys.executable, "-c", "import os; print(os.getuid(), flush=True)"],
            user="root",
            start_seconds=0,
            restart=msgspec.to_builtins(RestartPolicy(policy=RestartPolicyKind.NEVER)),
        )
        assert not isinstance(await _place(op, issuer, spec), ErrorReply)
        status = await _status_until(op, issuer, "as-root", {AgentState.EXITED, AgentState.FAILED})
        assert (status.state, status.exit_code) == (AgentState.EXITED, 0)
        assert (tmp_path / "node" / "logs" / "as-root" / "stdout.log").read_text() == "0\n"


# --- the controller, at `fabric run` time ----------------------------------------


@pytest.fixture
async def controller(pki: FabricPki, connect_as: Clients) -> AsyncIterator[Controller]:
    ctl = Controller(await connect_as("ctl-1"), controller_config(pki, "ctl-1"))
    async with running(ctl):
        yield ctl


async def test_controller_refuses_spec_abuse_at_create_and_update(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer
) -> None:
    op = await connect_as("op-1")
    events = await Events.on(op, "events.controller.refused")
    cases = [
        ("c-env", {"env": {"FABRIC_NODE_ID": "n2"}}, ErrorCode.SPEC_ENV_RESERVED),
        ("c-cwd", {"cwd": "relative/dir"}, ErrorCode.SPEC_CWD_FORBIDDEN),
        ("c-dotdot", {"cwd": "/srv/../etc"}, ErrorCode.SPEC_CWD_FORBIDDEN),
        ("c-root", {"user": "root"}, ErrorCode.SPEC_ROOT_FORBIDDEN),
    ]
    for name, fields, code in cases:
        body = encode(
            {
                "deployment": {"spec": _spec(name, **fields)},
                "token": issuer.mint("op-1", ["agents:run"]),
            }
        )
        msg = await op.request(subjects.api("create"), body, timeout=10)
        reply = decode(msg.data, ApiResult | ErrorReply)
        assert isinstance(reply, ErrorReply) and reply.code is code, (name, reply)
        event = await events.wait(lambda e, n=name: e.data["target"] == n)
        assert (event.data["code"], event.data["op"]) == (code.value, "create")
        assert controller.refused[code.value] >= 1
    # An existing deployment cannot be updated into abuse either.
    good = {"deployment": {"spec": _spec("c-good")}, "token": issuer.mint("op-1", ["agents:run"])}
    created = decode(
        (await op.request(subjects.api("create"), encode(good))).data, ApiResult | ErrorReply
    )
    assert isinstance(created, ApiResult), created
    bad = {
        "deployment": {"spec": _spec("c-good", env={"FABRIC_AGENT_ID": "x"})},
        "token": issuer.mint("op-1", ["agents:run"]),
    }
    msg = await op.request(subjects.api("update"), encode(bad), timeout=10)
    reply = decode(msg.data, ApiResult | ErrorReply)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.SPEC_ENV_RESERVED
    # Nothing of the refused ones was stored; the good one is unchanged.
    listed = decode(
        (
            await op.request(
                subjects.api("list"), encode({"token": issuer.mint("op-1", ["read"])}), timeout=10
            )
        ).data,
        ApiResult,
    )
    assert [d.name for d in listed.deployments] == ["c-good"]
    assert listed.deployments[0].deployment.spec.env == {}


async def test_fabric_run_reports_the_refusal(
    controller: Controller, pki: FabricPki, nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")},
        "FABRIC_NATS_URL": nats_server.url,
        "FABRIC_CA": str(pki.ca),
        "FABRIC_CERT": str(pki["op-1"].cert),
        "FABRIC_KEY": str(pki["op-1"].key),
        "FABRIC_TOKEN_KEY": str(pki.dir / "signing.key"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabric", "run", "r-env", "--no-wait",
        "--env", "FABRIC_AGENT_ID=someone-else", "--", "true",
        env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, (out, err)
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabric: "), err
    assert "FABRIC_AGENT_ID" in lines[0] and "fabric's own" in lines[0]


def test_the_node_settings_come_from_flags_or_environment(
    monkeypatch: pytest.MonkeyPatch, pki: FabricPki
) -> None:
    from node_agent.main import _config, build_parser

    base = ["--node-id", "n1", "--token-key", str(pki.dir / "signing.pub")]
    default = _config(build_parser().parse_args(base))
    assert default.spec_policy == NodeSpecPolicy(allow_root_agents=False, cwd_root=None)
    flagged = _config(
        build_parser().parse_args([*base, "--allow-root-agents", "--agent-cwd-root", "/srv/a"])
    )
    assert flagged.spec_policy == NodeSpecPolicy(allow_root_agents=True, cwd_root=Path("/srv/a"))
    monkeypatch.setenv("FABRIC_ALLOW_ROOT_AGENTS", "1")
    monkeypatch.setenv("FABRIC_AGENT_CWD_ROOT", "/srv/b")
    from_env = _config(build_parser().parse_args(base))
    assert from_env.spec_policy == NodeSpecPolicy(allow_root_agents=True, cwd_root=Path("/srv/b"))
    with pytest.raises(ValueError, match="absolute"):
        _config(build_parser().parse_args([*base, "--agent-cwd-root", "relative"]))


def test_an_exec_task_with_a_reserved_env_or_bad_cwd_is_dead_on_arrival() -> None:
    """Batch tasks become one-shot agents: the same rules, checked when the
    payload is read, so the task is dead at once with the code instead of
    waiting for a node to refuse its placement."""
    assert parse_payload({"argv": ["true"], "env": {"OK": "1"}, "cwd": "/tmp"}).cwd == "/tmp"
    cases = [
        ({"argv": ["true"], "env": {"FABRIC_CERT": "/x"}}, ErrorCode.SPEC_ENV_RESERVED),
        ({"argv": ["true"], "cwd": "relative"}, ErrorCode.SPEC_CWD_FORBIDDEN),
        ({"argv": ["true"], "cwd": "/srv/../etc"}, ErrorCode.SPEC_CWD_FORBIDDEN),
    ]
    for payload, code in cases:
        with pytest.raises(ContractError) as info:
            parse_payload(payload)
        assert info.value.code is code, payload
