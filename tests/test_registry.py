"""The registry against a real nats-server: buckets, compare-and-set, mirrors."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from natsfixtures import Clients

from fabric.controller.registry import Mirror, delete, mutate, read, write
from fabric.controller.streams import (
    EVENTS_STREAM,
    Buckets,
    StreamSettings,
    cluster_size,
    ensure_state,
)
from schemas.errors import ContractError, ErrorCode


class Counter(msgspec.Struct, frozen=True):
    n: int


async def _state(connect_as: Clients) -> tuple[Buckets, Buckets]:
    a = await connect_as("ctl-1")
    b = await connect_as("ctl-1")
    # Two controllers starting together: both must end up with the same state.
    return await asyncio.gather(
        ensure_state(a, a.jetstream(), StreamSettings()),
        ensure_state(b, b.jetstream(), StreamSettings()),
    )


async def test_ensure_state_is_idempotent_and_single_replica(connect_as: Clients) -> None:
    nc = await connect_as("ctl-1")
    assert cluster_size(nc) == 1
    await _state(connect_as)
    await ensure_state(nc, nc.jetstream(), StreamSettings())
    info = await nc.jetstream().stream_info(EVENTS_STREAM)
    assert info.config.subjects == ["events.>"]
    assert info.config.num_replicas == 1
    assert info.config.max_age == 7 * 24 * 3600


async def test_cas_race_exactly_one_wins(connect_as: Clients) -> None:
    a, b = await _state(connect_as)
    revision = await write(a.agents, "race", Counter(0), None)
    results = await asyncio.gather(
        write(a.agents, "race", Counter(1), revision),
        write(b.agents, "race", Counter(2), revision),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, ContractError)]
    assert len(wins) == 1
    assert len(losses) == 1
    assert losses[0].code is ErrorCode.CONFLICT
    stored = await read(a.agents, "race", Counter)
    assert stored is not None
    assert stored[0].n in (1, 2)
    assert stored[1] == wins[0]


async def test_create_twice_conflicts_and_recreate_after_delete_works(
    connect_as: Clients,
) -> None:
    a, _ = await _state(connect_as)
    revision = await write(a.agents, "once", Counter(1), None)
    with pytest.raises(ContractError) as info:
        await write(a.agents, "once", Counter(2), None)
    assert info.value.code is ErrorCode.CONFLICT
    with pytest.raises(ContractError):
        await delete(a.agents, "once", revision - 1)
    await delete(a.agents, "once", revision)
    assert await read(a.agents, "once", Counter) is None
    await write(a.agents, "once", Counter(3), None)


async def test_mutate_retries_until_every_increment_lands(connect_as: Clients) -> None:
    a, b = await _state(connect_as)

    def bump(current: Counter | None) -> Counter:
        return Counter((current.n if current else 0) + 1)

    async def worker(kv: object) -> None:
        for _ in range(15):
            await mutate(kv, "counter", Counter, bump, attempts=50)  # type: ignore[arg-type]

    await asyncio.gather(worker(a.agents), worker(b.agents))
    stored = await read(a.agents, "counter", Counter)
    assert stored is not None
    assert stored[0].n == 30


async def test_mutate_without_change_writes_nothing(connect_as: Clients) -> None:
    a, _ = await _state(connect_as)
    await write(a.agents, "same", Counter(1), None)
    result = await mutate(a.agents, "same", Counter, lambda c: c)
    assert result.value == Counter(1)
    assert not result.changed


async def test_mirror_follows_puts_and_deletes(connect_as: Clients) -> None:
    a, _ = await _state(connect_as)
    await a.nodes.put("m1", msgspec.json.encode(Counter(1)))
    mirror = Mirror(a.nodes, Counter)
    task = asyncio.create_task(mirror.run())
    try:
        async with asyncio.timeout(5):
            await mirror.ready.wait()
        assert mirror.items["m1"][0] == Counter(1)
        await a.nodes.put("m2", msgspec.json.encode(Counter(2)))
        await a.nodes.put("bad", b"not json")
        await a.nodes.delete("m1")
        async with asyncio.timeout(5):
            while "m1" in mirror.items or "m2" not in mirror.items or not mirror.bad_values:
                mirror.changed.clear()
                await mirror.changed.wait()
        assert set(mirror.items) == {"m2"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
