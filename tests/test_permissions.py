"""Role permissions: the pure table, and a real server enforcing it.

One table of (identity, subject, allowed) drives both the unit test of
``permissions_for`` and the live test, so the Python model and nats-server
cannot drift apart. A refusal is observed the way nats-py reports it: a
"permissions violation" in ``error_cb`` and nothing delivered. "Nothing
delivered" is proven without sleeping: the same connection then sends a
marker, and NATS keeps one connection's messages in order, so once the
marker has arrived a forbidden message would already be there.
"""

from __future__ import annotations

import json

import nats.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from natsfixtures import IDENTITIES, Clients, ErrorLog

from fabric.permissions import ROLE_PERMISSIONS, permissions_for, subject_matches
from schemas.task import MAX_BATCH_ASSIGNMENTS

# (identity, subject, allowed)
PUBLISH_CASES: list[tuple[str, str, bool]] = [
    ("view-1", "agents.x.commands", False),
    ("view-1", "nodes.n1.commands", False),
    ("view-1", "events.agent.started", False),
    ("view-1", "tasks.build.queue", False),
    ("view-1", "fabric.discover", True),
    ("view-1", "$SRV.PING", True),
    ("view-1", "$SRV.INFO.node-agent", True),
    ("n1", "nodes.n1.heartbeat", True),
    ("n1", "nodes.n1.register", True),
    ("n1", "nodes.n2.heartbeat", False),
    ("n1", "nodes.n2.register", False),
    ("n1", "nodes.n1.commands", False),
    ("n1", "agents.a1.status", True),
    ("n1", "agents.a1.logs", True),
    ("n1", "agents.a1.commands", False),
    ("n1", "agents.a1.tasks", False),
    ("n1", "events.agent.exited", True),
    ("n1", "events.node.lost", True),
    ("n1", "events.task.done", False),
    ("n1", "tasks.build.queue", False),
    ("n1", "fabric.discover", True),
    ("n1", "$JS.API.INFO", False),
    ("n2", "nodes.n2.heartbeat", True),
    ("n2", "nodes.n1.heartbeat", False),
    ("op-1", "agents.x.commands", True),
    ("op-1", "nodes.n1.commands", True),
    ("op-1", "tasks.build.queue", True),
    ("op-1", "fabric.api.list", True),
    ("op-1", "nodes.n1.heartbeat", False),
    ("op-1", "agents.x.status", False),
    ("op-1", "agents.x.tasks", False),
    ("op-1", "events.agent.exited", False),
    ("work-1", "events.task.done", True),
    ("work-1", "agents.x.commands", False),
    ("work-1", "agents.x.status", False),
    ("work-1", "agents.x.tasks", False),
    ("work-1", "fabric.discover", False),
    ("ctl-1", "agents.x.tasks", True),
    ("ctl-1", "agents.x.commands", True),
    ("ctl-1", "nodes.n1.commands", True),
    ("ctl-1", "events.node.lost", True),
]

# (identity, subscription, a concrete subject it would receive, allowed)
SUBSCRIBE_CASES: list[tuple[str, str, str, bool]] = [
    ("view-1", "agents.*.status", "agents.x.status", True),
    ("view-1", "agents.x.logs", "agents.x.logs", True),
    ("view-1", "nodes.*.heartbeat", "nodes.n1.heartbeat", True),
    ("view-1", "events.>", "events.agent.exited", True),
    ("view-1", "agents.*.commands", "agents.x.commands", False),
    ("view-1", "agents.x.tasks", "agents.x.tasks", False),
    ("view-1", "nodes.n1.commands", "nodes.n1.commands", False),
    ("view-1", ">", "agents.x.commands", False),
    ("n1", "nodes.n1.commands", "nodes.n1.commands", True),
    ("n1", "agents.*.commands", "agents.x.commands", True),
    ("n1", "nodes.n2.commands", "nodes.n2.commands", False),
    ("n1", "nodes.*.commands", "nodes.n2.commands", False),
    ("n1", "nodes.*.heartbeat", "nodes.n2.heartbeat", False),
    ("n1", "agents.x.tasks", "agents.x.tasks", False),
    ("n1", "events.>", "events.agent.exited", False),
    ("op-1", "agents.*.status", "agents.x.status", True),
    ("op-1", "events.>", "events.node.lost", True),
    ("op-1", "agents.x.commands", "agents.x.commands", False),
    ("op-1", "tasks.build.queue", "tasks.build.queue", False),
    ("work-1", "agents.w1.tasks", "agents.w1.tasks", True),
    ("work-1", "agents.*.tasks", "agents.w1.tasks", True),
    ("work-1", "agents.w1.commands", "agents.w1.commands", False),
    ("work-1", "events.>", "events.task.done", False),
    ("ctl-1", "nodes.*.heartbeat", "nodes.n1.heartbeat", True),
    ("ctl-1", "agents.*.status", "agents.x.status", True),
    ("ctl-1", "tasks.*.queue", "tasks.build.queue", True),
    # Replies: each identity reads only its own inboxes.
    ("view-1", "_INBOX.view-1.>", "_INBOX.view-1.abc", True),
    ("view-1", "_INBOX.>", "_INBOX.op-1.abc", False),
    ("view-1", "_INBOX.op-1.>", "_INBOX.op-1.abc", False),
    ("work-1", "_INBOX.*.>", "_INBOX.op-1.abc", False),
    ("work-1", "_INBOX.op-1.abc", "_INBOX.op-1.abc", False),
    ("n1", "_INBOX.n2.>", "_INBOX.n2.abc", False),
    ("op-1", "_INBOX.ctl-1.>", "_INBOX.ctl-1.abc", False),
    ("ctl-1", "_INBOX.op-1.>", "_INBOX.op-1.abc", False),
    ("ctl-1", "_INBOX.ctl-1.>", "_INBOX.ctl-1.abc", True),
]


def _case_id(case: tuple[object, ...]) -> str:
    allowed = "allowed" if case[-1] else "refused"
    return f"{case[0]}:{case[1]}:{allowed}"


# -- pure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "subject", "allowed"), PUBLISH_CASES, ids=map(_case_id, PUBLISH_CASES)
)
def test_model_publish(name: str, subject: str, allowed: bool) -> None:
    assert permissions_for(IDENTITIES[name], name).may_publish(subject) is allowed


@pytest.mark.parametrize(
    ("name", "pattern", "probe", "allowed"), SUBSCRIBE_CASES, ids=map(_case_id, SUBSCRIBE_CASES)
)
def test_model_subscribe(name: str, pattern: str, probe: str, allowed: bool) -> None:
    assert permissions_for(IDENTITIES[name], name).may_subscribe(pattern) is allowed


def test_node_row_is_bound_to_its_own_id() -> None:
    perms = permissions_for("node", "n7")
    assert "nodes.n7.heartbeat" in perms.publish
    assert "nodes.n7.commands" in perms.subscribe
    assert not any("{name}" in p for p in (*perms.publish, *perms.subscribe))
    assert perms.allow_responses


@pytest.mark.parametrize(
    "name", ["", "N1", "a.b", "*", ">", "a b", "-x", "x" * 64, "n1\n", "nodes.>", "é"]
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid identity name"):
        permissions_for("node", name)


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        permissions_for("admin", "x")


def test_every_role_has_a_row_and_renders() -> None:
    from fabric.pki import ROLES

    assert set(ROLES) == set(ROLE_PERMISSIONS)
    for role in ROLES:
        config = permissions_for(role, "someone").to_config()
        json.dumps(config)
        assert config["publish"] and config["subscribe"]


def test_reply_allowances_render_as_the_server_expects() -> None:
    rendered = {
        r: permissions_for(r, "someone").to_config().get("allow_responses")
        for r in ROLE_PERMISSIONS
    }
    assert rendered == {
        "controller": True,
        "node": True,
        "operator": None,
        "viewer": None,
        # One reply per assignment of a TaskBatch, for as long as a task may run.
        "worker": {"max": MAX_BATCH_ASSIGNMENTS, "expires": "24h"},
    }


def test_viewer_and_worker_have_no_broad_jetstream() -> None:
    for role in ("viewer", "worker", "node"):
        perms = permissions_for(role, "x")
        assert not perms.may_publish("$JS.API.STREAM.PURGE.EVENTS")
        assert not perms.may_publish("$JS.API.STREAM.CREATE.TASKS")
        assert not perms.may_publish("$KV.nodes.n1")


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("a.*", "a.*", True),
        ("a.b", "a.*", False),
        ("a.*", "a.>", False),
        ("a.>", "a.*", True),
        ("a.b.c", "a.b", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


_ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)


@given(own=_ids, other=_ids)
def test_a_node_speaks_only_for_itself(own: str, other: str) -> None:
    perms = permissions_for("node", own)
    for leaf in ("heartbeat", "register", "commands"):
        if other != own:
            assert not perms.may_publish(f"nodes.{other}.{leaf}")
            assert not perms.may_subscribe(f"nodes.{other}.{leaf}")
    assert perms.may_publish(f"nodes.{own}.heartbeat")


# -- live -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "subject", "allowed"), PUBLISH_CASES, ids=map(_case_id, PUBLISH_CASES)
)
async def test_server_enforces_publish(
    connect_as: Clients, name: str, subject: str, allowed: bool
) -> None:
    watcher = await connect_as("ctl-1")
    sub = await watcher.subscribe(subject)
    marker_subject = "events.task.marker" if name == "work-1" else "fabric.discover"
    marker_sub = await watcher.subscribe(marker_subject)
    await watcher.flush()

    errors = ErrorLog()
    nc = await connect_as(name, error_cb=errors)
    await nc.publish(subject, b"probe")
    await nc.publish(marker_subject, b"marker")
    await nc.flush()

    if allowed:
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"probe"
        assert not errors.violations
    else:
        await errors.wait_for(f'permissions violation for publish to "{subject}"')
        # The marker came after the probe on one connection: had the probe
        # been let through, it would be queued already.
        while (await marker_sub.next_msg(timeout=5)).data != b"marker":
            pass
        assert sub.pending_msgs == 0


@pytest.mark.parametrize(
    ("name", "pattern", "probe", "allowed"), SUBSCRIBE_CASES, ids=map(_case_id, SUBSCRIBE_CASES)
)
async def test_server_enforces_subscribe(
    connect_as: Clients, name: str, pattern: str, probe: str, allowed: bool
) -> None:
    errors = ErrorLog()
    nc = await connect_as(name, error_cb=errors)
    sub = await nc.subscribe(pattern)
    marker_subject = nc.new_inbox()
    marker_sub = await nc.subscribe(marker_subject)
    await nc.flush()
    if not allowed:
        await errors.wait_for(f'permissions violation for subscription to "{pattern}"')

    ctl = await connect_as("ctl-1")
    await ctl.publish(probe, b"probe")
    await ctl.publish(marker_subject, b"marker")
    await ctl.flush()
    await marker_sub.next_msg(timeout=5)
    if allowed:
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"probe"
        assert not errors.violations
    else:
        assert sub.pending_msgs == 0


async def test_operator_commands_an_agent_and_the_node_replies(connect_as: Clients) -> None:
    node = await connect_as("n1")

    async def handle(msg: object) -> None:
        await msg.respond(b"done")  # type: ignore[attr-defined]

    await node.subscribe("agents.x.commands", cb=handle)
    await node.flush()
    operator = await connect_as("op-1")
    reply = await operator.request("agents.x.commands", b"restart", timeout=5)
    assert reply.data == b"done"


async def test_controller_hands_a_task_to_a_worker(connect_as: Clients) -> None:
    worker = await connect_as("work-1")

    async def handle(msg: object) -> None:
        await msg.respond(b"result")  # type: ignore[attr-defined]

    await worker.subscribe("agents.w1.tasks", cb=handle)
    await worker.flush()
    controller = await connect_as("ctl-1")
    reply = await controller.request("agents.w1.tasks", b"task", timeout=5)
    assert reply.data == b"result"


async def test_viewer_pings_a_node_service(connect_as: Clients) -> None:
    node = await connect_as("n1")

    async def handle(msg: object) -> None:
        await msg.respond(b'{"type":"io.nats.micro.v1.ping_response"}')  # type: ignore[attr-defined]

    await node.subscribe("$SRV.PING", cb=handle)
    await node.flush()
    viewer = await connect_as("view-1")
    reply = await viewer.request("$SRV.PING", b"", timeout=5)
    assert b"ping_response" in reply.data


async def test_a_node_replies_once_per_request(connect_as: Clients) -> None:
    errors = ErrorLog()
    node = await connect_as("n1", error_cb=errors)
    sub = await node.subscribe("agents.x.commands")
    await node.flush()
    operator = await connect_as("op-1")
    inbox = operator.new_inbox()
    replies = await operator.subscribe(inbox)
    await operator.publish("agents.x.commands", b"cmd", reply=inbox)
    await operator.flush()
    request = await sub.next_msg(timeout=5)
    await node.publish(request.reply, b"first")
    await node.publish(request.reply, b"second")
    await node.flush()
    assert (await replies.next_msg(timeout=5)).data == b"first"
    await errors.wait_for("permissions violation for publish")
    assert replies.pending_msgs == 0


async def test_a_worker_replies_to_a_batch_up_to_its_size(connect_as: Clients) -> None:
    errors = ErrorLog()
    worker = await connect_as("work-1", error_cb=errors)
    sub = await worker.subscribe("agents.w1.tasks")
    await worker.flush()
    controller = await connect_as("ctl-1")
    inbox = controller.new_inbox()
    replies = await controller.subscribe(inbox)
    await controller.publish("agents.w1.tasks", b"batch", reply=inbox)
    await controller.flush()
    request = await sub.next_msg(timeout=5)
    for i in range(MAX_BATCH_ASSIGNMENTS + 1):
        await worker.publish(request.reply, str(i).encode())
    await worker.flush()
    got = [(await replies.next_msg(timeout=5)).data for _ in range(MAX_BATCH_ASSIGNMENTS)]
    assert got == [str(i).encode() for i in range(MAX_BATCH_ASSIGNMENTS)]
    await errors.wait_for("permissions violation for publish")
    assert replies.pending_msgs == 0


async def test_viewer_replays_events_but_cannot_change_the_stream(connect_as: Clients) -> None:
    controller = await connect_as("ctl-1")
    cjs = controller.jetstream()
    await cjs.add_stream(name="EVENTS", subjects=["events.>"])
    for i in range(3):
        await cjs.publish(f"events.agent.e{i}", f"event-{i}".encode())

    errors = ErrorLog()
    viewer = await connect_as("view-1", error_cb=errors)
    vjs = viewer.jetstream()
    sub = await vjs.subscribe("events.>", ordered_consumer=True)
    seen = [(await sub.next_msg(timeout=5)).data for _ in range(3)]
    assert seen == [b"event-0", b"event-1", b"event-2"]
    assert not errors.violations

    # A refused publish gets no answer at all: the API call times out.
    with pytest.raises(nats.errors.TimeoutError):
        await viewer.jetstream(timeout=1).purge_stream("EVENTS")
    await errors.wait_for('permissions violation for publish to "$js.api.stream.purge.events"')
    info = await cjs.stream_info("EVENTS")
    assert info.state.messages == 3


async def test_node_has_no_jetstream(connect_as: Clients) -> None:
    errors = ErrorLog()
    node = await connect_as("n1", error_cb=errors)
    with pytest.raises(nats.errors.TimeoutError):
        await node.jetstream(timeout=1).account_info()
    await errors.wait_for('permissions violation for publish to "$js.api.info"')
