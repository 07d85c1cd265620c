"""Hypothesis-driven fuzzing of every inbound subject of a live node agent and controller.

Subjects: ``nodes.n1.commands`` and ``agents.<id>.commands`` of a running
node agent; ``nodes.n1.register``, ``fabric.discover``, ``fabric.api.<m>``
for every API method (and for random method names) of a running controller.

Bodies: random bytes, arbitrary JSON, deep nesting, huge bodies, and, most
often, a valid-shaped message of the subject mutated 0-3 times (a field
replaced by a wrong type, a subject-injection string such as ``a.b``, ``*``,
``>``, an invalid id, a huge string or list, a deeply nested value; a field
deleted or an unknown one added), carrying no token, junk, a forged or an
expired token, or a valid read-only one (so some requests go all the way
through, and none can change anything).

Asserted for each case: a reply comes (no crash, no hang) and it is either an
ErrorReply with a contract code other than ``internal``, or the subject's
valid result. After the barrage: the service still answers a valid request,
and nothing changed (the node's agents, the controller's deployments).

``FABRIC_FUZZ_EXAMPLES`` sets the cases per subject (default 2,000 in CI);
``bench/chaos/fuzz.py`` runs the same engine with many more and prints a table.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleetfixtures import controller_config, node_info, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from natsfixtures import Clients, FabricPki
from test_security_rig import SLEEPER, forged_token, node_config, running_node

from fabric.controller.service import Controller
from fabric.nats_server import NatsServer
from fabric.tokens import TokenIssuer
from node_agent.service import NodeAgent
from schemas import subjects
from schemas.agent import AgentSpec, AgentState
from schemas.api import API_METHODS, ApiResult
from schemas.codec import decode, encode
from schemas.command import CommandResult, ListAgents, PlaceAgent, StatusAgent
from schemas.discovery import DiscoverReply
from schemas.errors import ErrorCode, ErrorReply
from schemas.node import RegisterReply, RegisterRequest

__all__ = ["Tally", "Target", "Tokens", "controller_targets", "fuzz", "node_targets"]

EXAMPLES = int(os.environ.get("FABRIC_FUZZ_EXAMPLES", "2000"))

# --- values an attacker would send ------------------------------------------------

INJECTIONS = [
    "a.b",
    "*",
    ">",
    "a.*",
    "a.>",
    "nodes.n2.commands",
    "$SRV.PING",
    "_INBOX.x",
    "a b",
    "a\tb",
    "a\r\nPUB x 1\r\n",
    "\x00",
    "",
    " ",
    "A",
    "-x",
    "_x",
    "x" * 64,
    "n1\n",
    "é",
    "..",
    "../../etc/passwd",
    "/etc/shadow",
    "$(reboot)",
    "; rm -rf /",
    "SIGKILL",
    "9" * 400,
    "root",
]
WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 2**63, 2**64, -(2**63) - 1, 1.5, -0.0, 1e308]
HUGE_SIZES = [1_000, 70_000, 300_000, 900_000]
DEEP = [64, 1_000, 10_000, 100_000]


@dataclass(frozen=True)
class _Raw:
    """JSON text put into a message as is (too deep for the json module to build)."""

    text: str


def _deep(depth: int, kind: str) -> _Raw:
    if kind == "list":
        return _Raw("[" * depth + "]" * depth)
    return _Raw('{"a":' * depth + "1" + "}" * depth)


def _dumps(value: Any) -> bytes:
    raws: dict[str, str] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, _Raw):
            marker = f"@@raw{len(raws)}@@"
            raws[marker] = v.text
            return marker
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), ensure_ascii=False)
    for marker, raw in raws.items():
        text = text.replace(json.dumps(marker), raw, 1)
    return text.encode("utf-8", "surrogatepass")


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
json_values = st.recursive(
    _json_leaves,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=16,
)

nasty_values: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(INJECTIONS),
    st.sampled_from(WRONG_TYPES),
    st.just([]),
    st.just({}),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=40),
    st.sampled_from(HUGE_SIZES).map(lambda n: "x" * n),
    st.integers(min_value=1_000, max_value=50_000).map(lambda n: ["a"] * n),
    st.builds(_deep, st.sampled_from(DEEP), st.sampled_from(["list", "dict"])),
    json_values,
)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) in a JSON-like value, depth first."""
    if isinstance(value, dict):
        for k in list(value):
            yield value, k
            yield from _slots(value[k])
    elif isinstance(value, list):
        for i in range(len(value)):
            yield value, i
            yield from _slots(value[i])


class Tokens:
    """Token choices for a fuzzed message: none, junk, forged, expired, or a valid read one."""

    def __init__(self, pki: FabricPki) -> None:
        self.issuer = TokenIssuer.from_file(pki.dir / "signing.key", issuer="fuzz")
        past = TokenIssuer.from_file(
            pki.dir / "signing.key", issuer="fuzz", clock=lambda: time.time() - 7200
        )
        self._static: list[str | None] = [
            None,
            "junk",
            "a.b.c",
            forged_token("mallory", ["agents:run", "agents:stop", "nodes:admin", "read"]),
            past.mint("fuzz-old", ["read", "agents:run"], ttl=60),
        ]

    def strategy(self) -> st.SearchStrategy[str | None]:
        fresh = st.just("read").map(lambda scope: self.issuer.mint("fuzz", [scope]))
        return st.one_of(st.sampled_from(self._static), fresh)


def mutated(bases: list[dict[str, Any]], tokens: Tokens) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(bases)))
        token = draw(tokens.strategy())
        if token is not None:
            message["token"] = token
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
            slots = list(_slots(message))
            if not slots:
                break
            container, key = draw(st.sampled_from(slots))
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                container[key] = copy.deepcopy(draw(nasty_values))
            elif action == "delete":
                del container[key]
            elif isinstance(container, dict):
                container[draw(st.text(max_size=12))] = copy.deepcopy(draw(nasty_values))
            else:
                container.append(copy.deepcopy(draw(nasty_values)))
        if "op" in message and draw(st.integers(min_value=0, max_value=3)) == 0:
            message["op"] = draw(st.sampled_from([*INJECTIONS[:6], "place", "stop", "shutdown"]))
        return _dumps(message)

    return build()


def bodies(bases: list[dict[str, Any]], tokens: Tokens) -> st.SearchStrategy[bytes]:
    structured = mutated(bases, tokens)
    return st.one_of(
        structured,
        structured,
        structured,
        structured,
        st.binary(max_size=512),
        json_values.map(_dumps),
        st.builds(_deep, st.sampled_from(DEEP), st.sampled_from(["list", "dict"])).map(_dumps),
        st.sampled_from(HUGE_SIZES).map(lambda n: b'{"op":"list","pad":"' + b"x" * n + b'"}'),
    )


# --- targets and the engine ------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One inbound subject (or a family of them) and how to fuzz it."""

    name: str
    sender: str
    """The identity allowed to publish there (others are stopped by the server)."""
    subjects: st.SearchStrategy[str]
    bodies: st.SearchStrategy[bytes]
    ok: Any
    """The type of a valid (non-error) reply."""


@dataclass
class Tally:
    """What one target answered."""

    examples: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    seconds: float = 0.0


def node_targets(tokens: Tokens, agent_id: str, node_id: str = "n1") -> list[Target]:
    spec = {"name": "fz", "argv": ["true"], "env": {"A": "b"}, "cwd": "/tmp", "labels": {}}
    node_bases: list[dict[str, Any]] = [
        {"op": "place", "spec": spec, "epoch": 1},
        {"op": "remove", "agent_id": agent_id, "epoch": 1},
        {"op": "list"},
        {"op": "drain"},
        {"op": "shutdown", "mode": "detach"},
    ]
    agent_bases: list[dict[str, Any]] = [
        {"op": "stop", "timeout": 1.0},
        {"op": "start"},
        {"op": "restart"},
        {"op": "signal", "signal": "SIGTERM"},
        {"op": "pause"},
        {"op": "resume"},
        {"op": "status"},
        {"op": "logs", "stream": "stdout", "lines": 10},
    ]
    return [
        Target(
            "node commands",
            "op-1",
            st.just(subjects.node_commands(node_id)),
            bodies(node_bases, tokens),
            CommandResult,
        ),
        Target(
            "agent commands",
            "op-1",
            st.just(subjects.agent_commands(agent_id)),
            bodies(agent_bases, tokens),
            CommandResult,
        ),
    ]


def _api_bases(method: str) -> list[dict[str, Any]]:
    deployment = {
        "spec": {"name": "fz", "argv": ["sleep", "1"]},
        "replicas": 2,
        "constraints": {"labels": {"zone": "a"}, "strategy": "spread"},
    }
    request = API_METHODS[method]
    fields = set(request.__struct_fields__)
    base: dict[str, Any] = {}
    if "deployment" in fields:
        base["deployment"] = deployment
    if "name" in fields:
        base["name"] = "fz"
    if "replicas" in fields:
        base["replicas"] = 3
    if "node_id" in fields:
        base["node_id"] = "n1"
    return [base]


def controller_targets(tokens: Tokens, node_id: str = "n1") -> list[Target]:
    register = msgspec.to_builtins(
        RegisterRequest(node=node_info(node_id, zone="a"), agents=[]),
    )
    register["agents"] = [{"agent_id": "fz", "state": "running", "epoch": 1, "pid": 42}]
    discover: list[dict[str, Any]] = [
        {"what": "nodes"},
        {"what": "agents", "ids": ["fz"], "labels": {"a": "b"}, "capability": "x", "limit": 5},
        {"what": "nodes", "state": "ready", "limit": 1},
    ]
    targets = [
        Target(
            "register",
            node_id,
            st.just(subjects.node_register(node_id)),
            bodies([register], tokens),
            RegisterReply,
        ),
        Target(
            "discover", "op-1", st.just(subjects.DISCOVER), bodies(discover, tokens), DiscoverReply
        ),
    ]
    for method in API_METHODS:
        targets.append(
            Target(
                f"api.{method}",
                "op-1",
                st.just(subjects.api(method)),
                bodies(_api_bases(method), tokens),
                ApiResult,
            )
        )
    any_method = st.from_regex(r"[A-Za-z0-9_$-]{1,40}", fullmatch=True)
    all_bases = [b for m in API_METHODS for b in _api_bases(m)]
    targets.append(
        Target(
            "api.<random>",
            "op-1",
            any_method.map(lambda m: f"{subjects.API_PREFIX}.{m}"),
            bodies(all_bases, tokens),
            ApiResult,
        )
    )
    return targets


class Body(bytes):
    """A fuzzed body whose repr stays short when hypothesis reports a failing case."""

    def __repr__(self) -> str:
        if len(self) <= 300:
            return bytes.__repr__(self)
        return f"{bytes.__repr__(self[:200])}...<{len(self)} bytes>...{bytes.__repr__(self[-60:])}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def classify(data: bytes, ok: Any) -> str:
    """``error:<code>`` or ``ok``; raises AssertionError for anything else."""
    try:
        error = decode(data, ErrorReply, max_bytes=64 * 1024 * 1024)
    except Exception:
        error = None
    if error is not None:
        assert error.code is not ErrorCode.INTERNAL, error
        return f"error:{error.code.value}"
    decode(data, ok, max_bytes=64 * 1024 * 1024)  # raises ContractError if neither
    return "ok"


async def fuzz(target: Target, nc: Client, examples: int, tally: Tally) -> None:
    """Run ``examples`` hypothesis cases of ``target`` through ``nc``, counting into ``tally``."""
    loop = asyncio.get_running_loop()

    async def ask(subject: str, body: bytes) -> bytes:
        msg = await nc.request(subject, body, timeout=15)
        return msg.data

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(subject=target.subjects, body=target.bodies.map(Body))
    def one(subject: str, body: Body) -> None:
        # Larger than the server takes: nats-py refuses to send it, so cut it short
        # (usually mid-JSON, which is one more malformed case).
        payload = bytes(body[: nc.max_payload])
        started = time.perf_counter()
        data = asyncio.run_coroutine_threadsafe(ask(subject, payload), loop).result(timeout=30)
        took = time.perf_counter() - started
        tally.examples += 1
        tally.slowest = max(tally.slowest, took)
        tally.replies[classify(data, target.ok)] += 1

    started = time.perf_counter()
    await asyncio.to_thread(one)
    tally.seconds += time.perf_counter() - started


# --- the tests ---------------------------------------------------------------------


@pytest.fixture
def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", issuer="tests")


@pytest.fixture
async def node(pki: FabricPki, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    async with running_node(node_config(pki, nats_server.url, tmp_path / "node")) as agent:
        yield agent


async def _call(nc: Client, subject: str, message: Any) -> Any:
    msg = await nc.request(subject, encode(message), timeout=10)
    return msg.data


# Thousands of cases per subject: slower than the suite's per-test bound.
@pytest.mark.timeout(900)
async def test_fuzzing_the_node_agent_crashes_nothing_and_changes_nothing(
    node: NodeAgent, connect_as: Clients, issuer: TokenIssuer, pki: FabricPki
) -> None:
    op = await connect_as("op-1")
    place = PlaceAgent(
        spec=AgentSpec(name="steady", argv=SLEEPER, start_seconds=0),
        token=issuer.mint("op-1", ["agents:run"]),
    )
    placed = decode(await _call(op, subjects.node_commands("n1"), place), CommandResult)
    assert placed.status is not None and placed.status.state is AgentState.RUNNING

    async def agents() -> list[tuple[str, AgentState, int | None, int]]:
        listed = decode(
            await _call(
                op, subjects.node_commands("n1"), ListAgents(token=issuer.mint("op-1", ["read"]))
            ),
            CommandResult,
        )
        return [(a.agent_id, a.state, a.pid, a.restarts) for a in listed.agents]

    before = await agents()
    tokens = Tokens(pki)
    tallies: dict[str, Tally] = {}
    started = time.monotonic()
    for target in node_targets(tokens, "steady"):
        tallies[target.name] = Tally()
        await fuzz(target, await connect_as(target.sender), EXAMPLES, tallies[target.name])
    elapsed = time.monotonic() - started

    # Still answering, nothing changed.
    assert await agents() == before
    status = decode(
        await _call(
            op, subjects.agent_commands("steady"), StatusAgent(token=issuer.mint("op-1", ["read"]))
        ),
        CommandResult,
    )
    assert status.status is not None and status.status.state is AgentState.RUNNING
    handler = node._handler
    assert handler is not None and not handler.draining
    assert handler.refused[ErrorCode.INTERNAL] == 0
    for name, tally in tallies.items():
        assert tally.examples >= EXAMPLES, name
        assert sum(n for k, n in tally.replies.items() if k.startswith("error:")), name
    # The refusal audit held the stream to its rate throughout.
    assert node.audit.emitted <= 10 + 10 * elapsed + 1


@pytest.fixture
async def controller(pki: FabricPki, connect_as: Clients) -> AsyncIterator[Controller]:
    ctl = Controller(await connect_as("ctl-1"), controller_config(pki, "ctl-1"))
    async with running(ctl):
        yield ctl


# Thousands of cases per subject: slower than the suite's per-test bound.
@pytest.mark.timeout(900)
async def test_fuzzing_the_controller_crashes_nothing_and_changes_nothing(
    controller: Controller, connect_as: Clients, issuer: TokenIssuer, pki: FabricPki
) -> None:
    op = await connect_as("op-1")
    # One deployment that no node can take (its label is never fuzzed), so only
    # an API call could change its desired state.
    keep = {
        "deployment": {
            "spec": {"name": "keep", "argv": ["sleep", "1"]},
            "replicas": 1,
            "constraints": {"labels": {"zone": "nowhere-at-all"}},
        },
        "token": issuer.mint("op-1", ["agents:run"]),
    }
    created = decode(await _call(op, subjects.api("create"), keep), ApiResult)
    assert created.changed

    def desired() -> dict[str, Any]:
        mirror = controller.deployments
        assert mirror is not None
        return {
            name: (r.deployment, r.generation, r.deleting, r.created_by)
            for name, (r, _) in mirror.items.items()
        }

    before = desired()
    tokens = Tokens(pki)
    tallies: dict[str, Tally] = {}
    for target in controller_targets(tokens):
        tallies[target.name] = Tally()
        await fuzz(target, await connect_as(target.sender), EXAMPLES, tallies[target.name])

    listed = decode(
        await _call(op, subjects.api("list"), {"token": issuer.mint("op-1", ["read"])}), ApiResult
    )
    assert [d.name for d in listed.deployments] == ["keep"]
    assert desired() == before
    found = decode(await _call(op, subjects.DISCOVER, {"what": "nodes"}), DiscoverReply)
    assert found.answered_by == "ctl-1"
    assert controller.refused[ErrorCode.INTERNAL.value] == 0
    for name, tally in tallies.items():
        assert tally.examples >= EXAMPLES, name


# --- defects the fuzzer found ----------------------------------------------------------


async def test_a_refusal_echoing_a_huge_value_is_still_a_valid_error_reply(
    node: NodeAgent, controller: Controller, connect_as: Clients
) -> None:
    """msgspec's error text quotes the offending value or field name; an error
    reply carrying 5,000 characters of it broke ErrorReply's 2,048 limit, so the
    caller could not even decode the refusal (found fuzzing fabric.discover)."""
    op = await connect_as("op-1")
    huge = "x" * 5000
    cases = [
        (subjects.DISCOVER, {"what": huge}),
        (subjects.api("list"), {huge: 1}),
        (subjects.node_commands("n1"), {"op": "list", huge: 1}),
        (subjects.node_commands("n1"), {"op": "shutdown", "mode": huge}),
    ]
    for subject, body in cases:
        msg = await op.request(subject, json.dumps(body).encode(), timeout=5)
        reply = decode(msg.data, ErrorReply)
        assert reply.code is ErrorCode.INVALID_PAYLOAD, subject
        assert len(reply.message) <= 2048
