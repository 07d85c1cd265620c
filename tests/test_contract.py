"""The wire contract: round trips, limits, subjects, generated files."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec, subjects
from schemas.agent import (
    AgentMetrics,
    AgentSpec,
    AgentState,
    AgentStatus,
    HealthSpec,
    HttpCheck,
    Limits,
    Transition,
)
from schemas.api import (
    API_METHODS,
    ApiResult,
    Constraints,
    CreateDeployment,
    DeleteDeployment,
    Deployment,
    DeploymentRecord,
    GetDeployment,
    ListDeployments,
    NodeRequest,
    ReplicaPlacement,
    ScaleDeployment,
    UpdateDeployment,
)
from schemas.command import CommandResult, PlaceAgent, SignalAgent, StopAgent
from schemas.contract import CHANNELS, MESSAGES, ApiRequest
from schemas.discovery import DiscoverReply, DiscoverRequest, NodeRecord
from schemas.errors import MAX_ERROR_MESSAGE, ContractError, ErrorCode, ErrorReply
from schemas.event import make_event
from schemas.generate import _PARAM_DOC, stale_files
from schemas.ids import validate_id
from schemas.logs import LogBatch, LogLine
from schemas.node import (
    AgentSummary,
    NodeHeartbeat,
    NodeInfo,
    NodeMetrics,
    NodeResources,
    NodeState,
    Placement,
    RegisterReply,
    RegisterRequest,
)
from schemas.task import (
    ExecConstraints,
    ExecPayload,
    ExecResult,
    Task,
    TaskAssignment,
    TaskBatch,
    TaskOutcome,
    TaskProgress,
    TaskResult,
    TaskResults,
)

NOW = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
SPEC = AgentSpec(
    name="web",
    argv=["python", "-m", "http.server"],
    env={"PORT": "8080"},
    health=HealthSpec(check=HttpCheck(url="http://127.0.0.1:8080/")),
    limits=Limits(memory_bytes=256 << 20, open_files=1024),
    capabilities=["summarize"],
    labels={"tier": "front"},
)
STATUS = AgentStatus(
    agent_id="web",
    node_id="n1",
    state=AgentState.RUNNING,
    since=NOW,
    pid=1234,
    metrics=AgentMetrics(1.5, 1 << 20, 3, 10, 0, 0, 1, 0),
    history=[Transition(None, AgentState.STARTING, NOW, "placed")],
)
NODE = NodeInfo(
    node_id="n1",
    hostname="host-1",
    pid=42,
    version="0.1.0",
    resources=NodeResources(cpus=2, memory_bytes=1 << 30),
    started_at=NOW,
)
TASK = Task(id="t-1", type="summarize", payload={"text": "hi"}, submitted_at=NOW)
DEPLOYMENT = Deployment(
    spec=SPEC, replicas=3, constraints=Constraints(labels={"zone": "a"}, max_per_node=1)
)
RECORD = DeploymentRecord(
    deployment=DEPLOYMENT,
    generation=2,
    replicas=[ReplicaPlacement(agent_id="web-0", node_id="n1", epoch=7, generation=2)],
    created_by="alice",
)

SAMPLES: dict[str, list[Any]] = {
    "AgentSpec": [SPEC, AgentSpec(name="sh", argv=["echo hi"], shell=True)],
    "AgentStatus": [STATUS],
    "AgentCommand": [StopAgent(token="t", timeout=2.0), SignalAgent(signal="SIGHUP")],
    "NodeCommand": [PlaceAgent(spec=SPEC, epoch=3, token="t")],
    "CommandResult": [CommandResult(op="status", node_id="n1", agent_id="web", status=STATUS)],
    "ErrorReply": [ErrorReply(code=ErrorCode.TOKEN_EXPIRED, message="expired")],
    "NodeHeartbeat": [
        NodeHeartbeat(
            node_id="n1",
            seq=7,
            sent_at=NOW,
            pid=42,
            agents=[AgentSummary("web", AgentState.RUNNING, 3, 1234)],
            metrics=NodeMetrics(10.0, 1, 2, 0.1, 0.2, 0.3, 4, 5),
        )
    ],
    "RegisterRequest": [RegisterRequest(node=NODE)],
    "RegisterReply": [RegisterReply(node_id="n1", agents=[Placement(SPEC, 3)])],
    "LogBatch": [
        LogBatch(agent_id="web", node_id="n1", seq=1, lines=[LogLine(NOW, "stdout", "hello")])
    ],
    "Task": [TASK],
    "TaskAssignment": [TaskAssignment(task=TASK, attempt=1, ack_wait=30)],
    "TaskResult": [
        TaskResult(
            task_id="t-1",
            agent_id="web",
            attempt=1,
            outcome=TaskOutcome.SUCCEEDED,
            result=[1, 2],
            started_at=NOW,
            finished_at=NOW,
        )
    ],
    "TaskBatch": [
        TaskBatch(
            assignments=[
                TaskAssignment(task=TASK, attempt=1, ack_wait=30),
                TaskAssignment(task=TASK, attempt=2, ack_wait=30, token="t"),
            ]
        )
    ],
    "TaskResults": [
        TaskResults(
            results=[
                TaskResult(
                    task_id="t-1",
                    agent_id="web",
                    attempt=1,
                    outcome=TaskOutcome.FAILED,
                    error="ValueError: bad input",
                    started_at=NOW,
                    finished_at=NOW,
                )
            ]
        )
    ],
    "TaskProgress": [TaskProgress(task_id="t-1", agent_id="web", attempt=1, fraction=0.5, at=NOW)],
    "ExecPayload": [
        ExecPayload(argv=["true"]),
        ExecPayload(
            argv=["make", "test"],
            env={"CI": "1"},
            cwd="/srv",
            timeout=600,
            constraints=ExecConstraints(labels={"zone": "b"}, capabilities=["build"]),
            tail=20,
        ),
    ],
    "ExecResult": [
        ExecResult(exit_code=0, duration=1.5, agent_id="exec-t-1-1", node_id="n1", stdout=["ok"]),
        ExecResult(signal="SIGKILL", duration=600.0, agent_id="exec-t-1-2", node_id="n2"),
    ],
    "CloudEvent": [make_event("agent.exited", source="/nodes/n1", subject="web", data={"code": 1})],
    "DiscoverRequest": [DiscoverRequest(what="nodes", labels={"tier": "front"})],
    "DiscoverReply": [
        DiscoverReply(nodes=[NodeRecord(info=NODE, state=NodeState.READY, last_heartbeat=NOW)])
    ],
    "ApiRequest": [
        ApiRequest(deployment=DEPLOYMENT, token="t"),  # type: ignore[call-arg]
        ApiRequest(name="web", replicas=2),  # type: ignore[call-arg]
        ApiRequest(node_id="n1"),  # type: ignore[call-arg]
    ],
    "CreateDeployment": [CreateDeployment(deployment=DEPLOYMENT, token="t")],
    "UpdateDeployment": [UpdateDeployment(deployment=DEPLOYMENT)],
    "ScaleDeployment": [ScaleDeployment(name="web", replicas=0, token="t")],
    "DeleteDeployment": [DeleteDeployment(name="web")],
    "GetDeployment": [GetDeployment(name="web", token="t")],
    "ListDeployments": [ListDeployments(token="t")],
    "NodeRequest": [NodeRequest(node_id="n1", token="t")],
    "ApiResult": [
        ApiResult(method="get", deployments=[RECORD]),
        ApiResult(
            method="cordon",
            changed=True,
            node=NodeRecord(info=NODE, state=NodeState.CORDONED, agents=["web-0"]),
        ),
    ],
}


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(MESSAGES)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_round_trip(name: str) -> None:
    for sample in SAMPLES[name]:
        data = codec.encode(sample)
        assert codec.decode(data, MESSAGES[name]) == sample


def test_times_are_rfc3339_with_offset() -> None:
    data = msgspec.json.decode(codec.encode(STATUS))
    assert data["since"] == "2026-11-27T12:00:00.123456Z"
    naive = codec.encode(STATUS).replace(b'Z"', b'"', 1)
    with pytest.raises(ContractError) as info:
        codec.decode(naive, AgentStatus)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ContractError) as info:
        codec.decode(b'{"name": "a", "argv": ["x"], "evil": 1}', AgentSpec)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD
    assert "evil" in info.value.message


def test_oversized_message_is_refused_before_decoding() -> None:
    with pytest.raises(ContractError) as info:
        codec.decode(b" " * 2048, AgentSpec, max_bytes=1024)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_field_limits() -> None:
    too_many_args = codec.encode({"name": "a", "argv": ["x"] * 2000})
    with pytest.raises(ContractError) as info:
        codec.decode(too_many_args, AgentSpec)
    assert "$.argv" in info.value.message


@pytest.mark.parametrize("name", ["web\n", "web\r", "web.x", "*", "Web"])
def test_ids_inside_messages_are_checked(name: str) -> None:
    with pytest.raises(ContractError) as info:
        codec.decode(codec.encode({"name": name, "argv": ["x"]}), AgentSpec)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD
    assert "$.name" in info.value.message


def test_shell_needs_one_string() -> None:
    with pytest.raises(ContractError) as info:
        codec.decode(b'{"name": "a", "argv": ["a", "b"], "shell": true}', AgentSpec)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_unknown_op_has_its_own_code() -> None:
    with pytest.raises(ContractError) as info:
        codec.decode_agent_command(b'{"op": "explode"}')
    assert info.value.code is ErrorCode.UNKNOWN_OP
    with pytest.raises(ContractError) as info:
        codec.decode_node_command(b'{"op": "stop"}')
    assert info.value.code is ErrorCode.UNKNOWN_OP


def test_known_op_with_bad_argument_is_invalid_payload() -> None:
    with pytest.raises(ContractError) as info:
        codec.decode_agent_command(b'{"op": "signal", "signal": "SIGSEGV"}')
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_deep_nesting_is_refused_not_crashed() -> None:
    deep = b'{"id": "t", "type": "x", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ContractError) as info:
        codec.decode(deep, Task)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_reply_decodes_either_kind() -> None:
    ok = codec.decode_reply(codec.encode(CommandResult(op="stop", node_id="n1")))
    err = codec.decode_reply(codec.encode(ErrorReply(code=ErrorCode.NOT_FOUND, message="no")))
    assert isinstance(ok, CommandResult)
    assert isinstance(err, ErrorReply)
    assert err.code is ErrorCode.NOT_FOUND


DECODERS = [
    *[(name, lambda data, t=t: codec.decode(data, t)) for name, t in MESSAGES.items()],
    ("agent_command", codec.decode_agent_command),
    ("node_command", codec.decode_node_command),
    ("reply", codec.decode_reply),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize(("name", "decoder"), DECODERS, ids=[d[0] for d in DECODERS])
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_fuzz_bytes_raise_only_contract_error(name: str, decoder: Any, data: bytes) -> None:
    try:
        decoder(data)
    except ContractError as exc:
        assert isinstance(exc.code, ErrorCode)


@pytest.mark.parametrize(("name", "decoder"), DECODERS, ids=[d[0] for d in DECODERS])
@settings(max_examples=200, deadline=None)
@given(
    value=st.dictionaries(
        st.sampled_from(["op", "name", "argv", "id", "spec", "node", "kind", "token"]),
        json_values,
        max_size=5,
    )
)
def test_fuzz_json_objects_raise_only_contract_error(name: str, decoder: Any, value: Any) -> None:
    try:
        decoder(msgspec.json.encode(value))
    except ContractError as exc:
        assert isinstance(exc.code, ErrorCode)


# --- ids and subjects ---------------------------------------------------------

BAD_IDS = ["", "A", "a.b", "*", ">", "a b", "-a", "_a", "a" * 64, "ä", "a\n", "a/b", "..", 5, None]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused(bad: Any) -> None:
    with pytest.raises(ContractError) as info:
        validate_id(bad)
    assert info.value.code is ErrorCode.INVALID_ID


@pytest.mark.parametrize("good", ["a", "web-1", "n_2", "0", "a" * 63])
def test_good_ids_pass(good: str) -> None:
    assert validate_id(good) == good


BUILDERS = {
    "agents.<agent_id>.commands": subjects.agent_commands,
    "agents.<agent_id>.status": subjects.agent_status,
    "agents.<agent_id>.logs": subjects.agent_logs,
    "agents.<agent_id>.tasks": subjects.agent_tasks,
    "nodes.<node_id>.commands": subjects.node_commands,
    "nodes.<node_id>.heartbeat": subjects.node_heartbeat,
    "nodes.<node_id>.register": subjects.node_register,
    "tasks.<task_type>.queue": subjects.task_queue,
    "events.<kind>": subjects.event,
    "fabric.api.*": subjects.api,
}


def _design_subjects() -> list[str]:
    design = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"
    if not design.exists():
        pytest.skip("shared/DESIGN.md is not beside the repository")
    table = design.read_text().split("## Subjects", 1)[1].split("\n\n", 2)[1]
    found = []
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        first_column = re.sub(r"\(.*?\)", "", line.split("|")[1])
        cells = re.findall(r"`([^`]+)`", first_column)
        found.extend(cells)
    return found


def test_every_design_subject_has_a_builder_and_a_parser() -> None:
    design = [s for s in _design_subjects() if not s.startswith("$SRV")]
    assert design, "found no subjects in DESIGN.md"
    for pattern in design:
        if pattern == "fabric.discover":
            assert subjects.parse_subject(subjects.DISCOVER).family is subjects.Family.DISCOVER
            continue
        sample = "agent.exited" if "<kind>" in pattern else "abc"
        builder = BUILDERS[pattern]
        subject = builder(sample)
        parsed = subjects.parse_subject(subject)
        assert parsed.id == sample
        assert subjects.parse_subject(subject) == parsed


@pytest.mark.parametrize("builder", list(BUILDERS.values()))
@pytest.mark.parametrize("bad", ["*", ">", "A", "", "a b", "a.*", "a.>", "a..b", "a.b.c.d.e"])
def test_builders_refuse_injection(builder: Any, bad: str) -> None:
    with pytest.raises(ContractError) as info:
        builder(bad)
    assert info.value.code is ErrorCode.INVALID_ID


@pytest.mark.parametrize("builder", [b for b in BUILDERS.values() if b is not subjects.event])
def test_id_builders_refuse_dots(builder: Any) -> None:
    with pytest.raises(ContractError) as info:
        builder("a.b")
    assert info.value.code is ErrorCode.INVALID_ID


@pytest.mark.parametrize(
    "bad",
    [
        "agents.*.status",
        "agents.a.b.status",
        "nodes.>",
        "events.>",
        "events.a",
        "tasks.x.y",
        "x",
        "",
    ],
)
def test_parser_refuses_non_fabric_subjects(bad: str) -> None:
    with pytest.raises(ContractError) as info:
        subjects.parse_subject(bad)
    assert info.value.code is ErrorCode.INVALID_ID


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80))
def test_parser_fuzz(text: str) -> None:
    try:
        parsed = subjects.parse_subject(text)
    except ContractError:
        return
    assert "*" not in text and ">" not in text
    assert parsed.family in subjects.Family


# --- generated files ----------------------------------------------------------


def test_every_channel_names_known_messages() -> None:
    for channel in CHANNELS:
        assert channel.message in MESSAGES
        assert all(r in MESSAGES for r in (*channel.reply, *channel.variants))


def test_every_api_request_fits_the_api_channel_message() -> None:
    # The channel's one message holds every method's request, as sent.
    for method, type_ in API_METHODS.items():
        for sample in SAMPLES[type_.__name__]:
            as_envelope = codec.decode(codec.encode(sample), ApiRequest)
            assert codec.decode(codec.encode(as_envelope), type_) == sample, method
        assert method in _PARAM_DOC["method"]


def test_generated_files_are_fresh() -> None:
    stale = stale_files()
    assert not stale, f"run `python -m schemas.generate`; stale: {[p.name for p in stale]}"


def test_a_refusal_quoting_huge_input_still_fits_the_wire() -> None:
    exc = ContractError(ErrorCode.INVALID_PAYLOAD, "bad field: " + "x" * 10_000)
    reply = codec.decode_reply(codec.encode(exc.to_reply()))
    assert isinstance(reply, ErrorReply)
    assert reply.code is ErrorCode.INVALID_PAYLOAD
    assert len(reply.message) == MAX_ERROR_MESSAGE
    assert reply.message.startswith("bad field: xxx")
