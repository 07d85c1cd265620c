"""fabric.tasks.atomic against a real nats-server: coalesced stored publishes
answer each message as if it had been published alone."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from natsfixtures import Clients

from fabric.nats_server import NatsServer
from fabric.tasks.atomic import AtomicWriter, WriteRefused, Written, allow_atomic

EXPECT = "Nats-Expected-Last-Subject-Sequence"


@pytest.fixture
async def stream(connect_as: Clients, nats_server: NatsServer) -> tuple[Client, str]:
    nc = await connect_as("ctl-1")
    name = f"ATOMIC_{uuid.uuid4().hex[:8].upper()}"
    # Under $KV: a subject family a controller identity may publish to.
    await nc.jetstream().add_stream(
        StreamConfig(name=name, subjects=[f"{_prefix(name)}.>"], duplicate_window=60)
    )
    return nc, name


def _prefix(name: str) -> str:
    return f"$KV.{name.lower()}"


async def test_writes_made_together_share_one_commit(stream: tuple[Client, str]) -> None:
    nc, name = stream
    assert await allow_atomic(nc.jetstream(), name)
    writer = AtomicWriter(nc, name)
    subject = f"{_prefix(name)}.k"

    written = await asyncio.gather(*(writer.write(f"{subject}{n}", b"v") for n in range(40)))

    seqs = [w.seq for w in written]
    assert seqs == list(range(1, 41))  # each got the sequence it is stored at
    # The first write went out alone; the other 39 waited for it and shared one commit.
    assert writer.commits == 1 and writer.refused_batches == 0
    info = await nc.jetstream().stream_info(name)
    assert info.state.messages == 40
    for n in (0, 17, 39):
        stored = await nc.jetstream().get_msg(name, seqs[n])
        assert stored.subject == f"{subject}{n}"


async def test_a_refused_message_fails_alone(stream: tuple[Client, str]) -> None:
    nc, name = stream
    assert await allow_atomic(nc.jetstream(), name)
    writer = AtomicWriter(nc, name)
    prefix = _prefix(name)
    first = await writer.write(f"{prefix}.taken", b"v", {EXPECT: "0"})

    results = await asyncio.gather(
        writer.write(f"{prefix}.warm", b"v"),  # goes alone; the rest share a batch
        *(writer.write(f"{prefix}.new{n}", b"v", {EXPECT: "0"}) for n in range(5)),
        writer.write(f"{prefix}.taken", b"again", {EXPECT: "0"}),
        return_exceptions=True,
    )

    *fresh, conflict = results
    assert all(isinstance(r, Written) for r in fresh), fresh
    assert isinstance(conflict, WriteRefused) and conflict.wrong_last_sequence
    # The batch was refused as a whole, then each message was published alone.
    assert writer.refused_batches == 1
    stored = await nc.jetstream().get_last_msg(name, f"{prefix}.taken")
    assert stored.seq == first.seq and stored.data == b"v"
    assert (await nc.jetstream().stream_info(name)).state.messages == 7


async def test_a_duplicate_message_id_is_reported_not_refused(
    stream: tuple[Client, str],
) -> None:
    nc, name = stream
    assert await allow_atomic(nc.jetstream(), name)
    writer = AtomicWriter(nc, name)
    subject = f"{_prefix(name)}.event"
    once = await writer.write(subject, b"e", {"Nats-Msg-Id": "event-1"})

    # In one batch with fresh ids: the server refuses the whole batch for the
    # duplicate id, and each is then answered alone.
    again = await asyncio.gather(
        *(writer.write(subject, b"e", {"Nats-Msg-Id": f"event-{n}"}) for n in range(1, 5))
    )

    assert again[0] == Written(once.seq, duplicate=True)
    assert [w.duplicate for w in again[1:]] == [False, False, False]
    assert (await nc.jetstream().stream_info(name)).state.messages == 4


async def test_without_atomic_batches_every_write_goes_alone(
    stream: tuple[Client, str],
) -> None:
    nc, name = stream
    writer = AtomicWriter(nc, name, atomic=False)
    prefix = _prefix(name)

    written = await asyncio.gather(*(writer.write(f"{prefix}.k{n}", b"v") for n in range(10)))
    with pytest.raises(WriteRefused) as refused:
        await writer.write(f"{prefix}.k3", b"v", {EXPECT: "0"})

    assert sorted(w.seq for w in written) == list(range(1, 11))
    assert refused.value.wrong_last_sequence
    assert writer.commits == 0


async def test_a_stream_that_is_not_there_is_not_made_atomic(
    connect_as: Clients, nats_server: NatsServer
) -> None:
    nc = await connect_as("ctl-1")
    assert not await allow_atomic(nc.jetstream(), "NO_SUCH_STREAM")
