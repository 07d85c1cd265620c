"""The leader lease against a real nats-server: one leader, takeover, handover, fencing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
from nats.aio.client import Client
from natsfixtures import Clients

from fabric.controller.lease import Lease, NotLeader
from fabric.controller.registry import mutate, read, write
from fabric.controller.streams import StreamSettings, ensure_state

TTL = 1.0


@asynccontextmanager
async def running(lease: Lease) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(lease.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _lease(
    connect_as: Clients, name: str, key: str, changes: list[str]
) -> tuple[Lease, Client]:
    nc = await connect_as("ctl-1")
    buckets = await ensure_state(nc, nc.jetstream(), StreamSettings(lease_ttl=TTL))

    async def on_change(leader: bool) -> None:
        changes.append(f"{name}:{'up' if leader else 'down'}")

    return Lease(buckets.lease, name, ttl=TTL, on_change=on_change, key=key), nc


async def _wait_leader(*leases: Lease, within: float) -> Lease:
    async with asyncio.timeout(within):
        while True:
            leaders = [lease for lease in leases if lease.is_leader]
            if leaders:
                assert len(leaders) == 1
                return leaders[0]
            await asyncio.sleep(0.02)


async def test_one_leader_then_takeover_after_a_crash(connect_as: Clients) -> None:
    changes: list[str] = []
    a, nc_a = await _lease(connect_as, "a", "crash", changes)
    b, nc_b = await _lease(connect_as, "b", "crash", changes)
    async with running(a) as task_a, running(b) as task_b:
        await _wait_leader(a, b, within=2)
        # Several renew periods with both running: never two leaders.
        for _ in range(30):
            assert a.is_leader + b.is_leader == 1
            await asyncio.sleep(TTL / 10)
        leader, standby = (a, b) if a.is_leader else (b, a)
        nc, task = (nc_a, task_a) if leader is a else (nc_b, task_b)
        # Crash the leader: its connection dies first, so it cannot hand over.
        await nc.close()
        task.cancel()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await _wait_leader(standby, within=TTL + 3 * standby.interval + 1.0)
        # TTL plus one poll, with slack for the server's expiry timer.
        assert loop.time() - start <= TTL + standby.interval + 1.0
    assert f"{standby.holder}:up" in changes


async def test_clean_stop_hands_over_at_once(connect_as: Clients) -> None:
    changes: list[str] = []
    a, _ = await _lease(connect_as, "a", "clean", changes)
    b, _ = await _lease(connect_as, "b", "clean", changes)
    async with running(a) as task_a:
        await _wait_leader(a, within=2)
        async with running(b):
            await asyncio.sleep(TTL / 2)
            assert not b.is_leader
            task_a.cancel()
            await asyncio.gather(task_a, return_exceptions=True)
            start = asyncio.get_running_loop().time()
            await _wait_leader(b, within=2)
            assert asyncio.get_running_loop().time() - start < TTL  # not waiting for expiry


async def test_leader_that_loses_the_key_steps_down(connect_as: Clients) -> None:
    changes: list[str] = []
    a, nc = await _lease(connect_as, "a", "stolen", changes)
    async with running(a):
        await _wait_leader(a, within=2)
        # Someone deletes the key and another holder takes it.
        kv = await nc.jetstream().key_value("fabric_lease")
        await kv.delete("stolen")
        await kv.create("stolen", b'{"holder":"x"}')
        async with asyncio.timeout(2):
            while True:
                if not a.is_leader:
                    break
                await asyncio.sleep(0.02)
        assert not a.valid()
    assert changes == ["a:up", "a:down"]


# --- fencing: the check a leader makes right before each write -------------------


class Value(msgspec.Struct, frozen=True):
    n: int


async def _take_over(standby: Lease, within: float) -> None:
    """Poll ``acquire`` as a standby does, until the old key has expired."""
    async with asyncio.timeout(within):
        while not await standby.acquire():  # noqa: ASYNC110
            await asyncio.sleep(standby.interval)  # wait-ok: the standby's poll period


async def test_fence_refuses_a_frozen_leader_and_its_guarded_write(connect_as: Clients) -> None:
    changes: list[str] = []
    a, nc = await _lease(connect_as, "a", "frozen", changes)
    b, _ = await _lease(connect_as, "b", "frozen", changes)
    assert await a.acquire()
    await a.fence()
    agents = (await ensure_state(nc, nc.jetstream(), StreamSettings(lease_ttl=TTL))).agents
    revision = await write(agents, "fenced", Value(1), None, guard=a.fence)
    # a freezes (no renewals: a paused process); b takes over once the key expires.
    await _take_over(b, within=TTL * 4)
    assert a.is_leader  # a has not noticed: it was frozen
    with pytest.raises(NotLeader):
        await a.fence()
    # Compare-and-set alone would let this late write through; the fence does not.
    with pytest.raises(NotLeader):
        await write(agents, "fenced", Value(2), revision, guard=a.fence)
    with pytest.raises(NotLeader):
        await mutate(agents, "fenced", Value, lambda v: Value(3), guard=a.fence)
    stored = await read(agents, "fenced", Value)
    assert stored == (Value(1), revision)
    await b.fence()


async def test_fence_asks_the_server_not_only_the_clock(connect_as: Clients) -> None:
    changes: list[str] = []
    a, nc = await _lease(connect_as, "a", "taken", changes)
    b, _ = await _lease(connect_as, "b", "taken", changes)
    assert await a.acquire()
    # The key is taken from under a well inside its validity by its own clock.
    kv = await nc.jetstream().key_value("fabric_lease")
    await kv.delete("taken")
    assert await b.acquire()
    assert a.valid()
    with pytest.raises(NotLeader, match="another acquisition"):
        await a.fence()


async def test_fence_accepts_the_leaders_own_renewal_in_flight(connect_as: Clients) -> None:
    a, _ = await _lease(connect_as, "a", "busy", [])
    assert await a.acquire()
    for _ in range(20):
        renewed, fenced = await asyncio.gather(a.renew(), a.fence(), return_exceptions=True)
        assert renewed is True
        assert fenced is None
