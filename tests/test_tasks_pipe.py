"""fabric.tasks.pipe against a real nats-server: stored publishes whose PubAcks
come back on one subscription answer each message as js.publish would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from natsfixtures import Clients

from fabric.nats_server import NatsServer
from fabric.tasks.client import NewTask, TaskClient
from fabric.tasks.pipe import StoredPublisher, WriteRefused, Written
from fabric.tasks.stream import allow_direct_get
from schemas.errors import ContractError, ErrorCode

EXPECT = "Nats-Expected-Last-Subject-Sequence"


def _prefix(name: str) -> str:
    # Under $KV: a subject family a controller identity may publish to.
    return f"$KV.{name.lower()}"


@pytest.fixture
async def stream(connect_as: Clients, nats_server: NatsServer) -> tuple[Client, str]:
    nc = await connect_as("ctl-1")
    name = f"PIPE_{uuid.uuid4().hex[:8].upper()}"
    await nc.jetstream().add_stream(
        StreamConfig(name=name, subjects=[f"{_prefix(name)}.>"], duplicate_window=60)
    )
    return nc, name


@pytest.fixture
async def pipe(stream: tuple[Client, str]) -> AsyncIterator[StoredPublisher]:
    publisher = StoredPublisher(stream[0], timeout=5.0)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


async def test_each_message_gets_the_sequence_it_is_stored_at(
    stream: tuple[Client, str], pipe: StoredPublisher
) -> None:
    nc, name = stream
    prefix = _prefix(name)

    written = await pipe.write_many([(f"{prefix}.k{n}", b"v%d" % n, None) for n in range(300)])

    assert written == [Written(n + 1) for n in range(300)]
    for n in (0, 157, 299):
        stored = await nc.jetstream().get_msg(name, n + 1)
        assert (stored.subject, stored.data) == (f"{prefix}.k{n}", b"v%d" % n)
    assert pipe.timeouts == 0


async def test_a_refused_message_fails_alone(
    stream: tuple[Client, str], pipe: StoredPublisher
) -> None:
    nc, name = stream
    prefix = _prefix(name)
    first = await pipe.write(f"{prefix}.taken", b"v", {EXPECT: "0"})

    outcomes = await pipe.write_many(
        [
            (f"{prefix}.new0", b"v", {EXPECT: "0"}),
            (f"{prefix}.taken", b"again", {EXPECT: "0"}),
            (f"{prefix}.new1", b"v", {EXPECT: "0"}),
            (f"{prefix}.taken", b"next", {EXPECT: str(first.seq)}),
        ]
    )

    fresh0, conflict, fresh1, update = outcomes
    assert isinstance(fresh0, Written) and isinstance(fresh1, Written)
    assert isinstance(conflict, WriteRefused) and conflict.wrong_last_sequence
    assert isinstance(update, Written)
    stored = await nc.jetstream().get_last_msg(name, f"{prefix}.taken")
    assert (stored.seq, stored.data) == (update.seq, b"next")
    with pytest.raises(WriteRefused) as refused:
        await pipe.write(f"{prefix}.taken", b"stale", {EXPECT: str(first.seq)})
    assert refused.value.wrong_last_sequence


async def test_a_duplicate_message_id_is_reported_not_stored_again(
    stream: tuple[Client, str], pipe: StoredPublisher
) -> None:
    nc, name = stream
    subject = f"{_prefix(name)}.event"
    once = await pipe.write(subject, b"e", {"Nats-Msg-Id": "event-1"})

    again = await pipe.write_many(
        [(subject, b"e", {"Nats-Msg-Id": f"event-{n}"}) for n in range(1, 4)]
    )

    assert again[0] == Written(once.seq, duplicate=True)
    assert [isinstance(w, Written) and w.duplicate for w in again] == [True, False, False]
    assert (await nc.jetstream().stream_info(name)).state.messages == 3


async def test_a_subject_no_stream_stores_is_no_responders(pipe: StoredPublisher) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await pipe.write("$KV.nobody_stores_this.key", b"v")


async def test_unanswered_writes_time_out_and_are_counted(
    connect_as: Clients, nats_server: NatsServer
) -> None:
    nc = await connect_as("ctl-1")
    publisher = StoredPublisher(nc, timeout=0.3)
    await publisher.start()
    # Nobody answers on core subjects the controller may publish to: no PubAck ever.
    listener = await connect_as("ctl-1")
    await listener.subscribe("fabric.pipe-test.>", cb=_ignore)
    await listener.flush()
    try:
        outcomes = await publisher.write_many([("fabric.pipe-test.a", b"v", None)] * 3)
    finally:
        await publisher.stop()

    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert publisher.timeouts == 3


async def test_direct_gets_are_turned_on(stream: tuple[Client, str]) -> None:
    nc, name = stream
    assert not (await nc.jetstream().stream_info(name)).config.allow_direct
    assert await allow_direct_get(nc.jetstream(), name)
    assert (await nc.jetstream().stream_info(name)).config.allow_direct
    assert not await allow_direct_get(nc.jetstream(), "NO_SUCH_STREAM")


async def _ignore(msg: object) -> None:
    return None


async def test_submit_many_ends_each_task_as_submit_would(
    connect_as: Clients, nats_server: NatsServer
) -> None:
    # No TASKS stream on this server: every publish finds no responders, is
    # tried again on its own until `within`, and ends with submit's error.
    tasks = TaskClient(await connect_as("op-1"), submitted_by="op-1")

    outcomes = await tasks.submit_many(
        [NewTask("echo", {"n": 1}), NewTask("echo", id="Bad Id"), NewTask("echo")], within=0.5
    )

    first, bad, last = outcomes
    assert isinstance(first, nats.js.errors.NoStreamResponseError)
    assert isinstance(bad, ContractError) and bad.code is ErrorCode.INVALID_ID
    assert isinstance(last, nats.js.errors.NoStreamResponseError)
