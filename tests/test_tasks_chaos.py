"""Task-queue chaos, short forms (issues 5 and 8); long forms in ``bench/chaos/``.

* kill -9 of the leader controller during a burst of 10,000 tasks, with two
  standbys (three controllers, all dispatching from the shared durable
  consumer), killed right as it hands a task to a worker: a new leader within
  the lease TTL plus one renew interval; every task has a stored result; each
  task's effect is in the workers' ledger exactly once when deduplicated by
  task id. Delivery is at least once: the tasks the dead leader had out on
  workers finish there, unrecorded, and run again once redelivered; those raw
  re-executions are counted and bounded by what one controller may have out.
* kill -9 of one of three NATS servers (TLS routes, R3 streams) under task
  load: every submit that got a PubAck ends with a stored result and its
  effect, every client (controllers, node agent, workers, submitter) is
  connected again to a server left; then the server comes back, rejoins
  (its replicas catch up) and takes load, and losing another server then
  loses nothing either.

Real parts only: nats-server processes, controllers, a ``fabric-node`` and its
worker agents are processes here, killed by pid; no sleep synchronises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from natsfixtures import FabricPki, run_sync
from taskchaos import ChaosRig, ClusterLoad, ServerLoss, leader_kill, stored_events

from fabric.nats_server import NatsCluster, NatsServer, free_port
from fabric.tasks.stream import RECORDS_BUCKET, TASKS_STREAM

BURST = 10_000
LEASE_TTL = 2.0
INTERVAL = LEASE_TTL / 3
CONTROLLERS = ("ctl-a", "ctl-b", "ctl-c")
WORKERS = 4
CONCURRENCY = 32


@pytest.fixture
async def single(pki: FabricPki, tmp_path: Path) -> AsyncIterator[ChaosRig]:
    server = NatsServer.local(pki.dir, tmp_path / "nats")
    await server.start()
    rig = ChaosRig(pki, tmp_path, [server.url])
    try:
        yield rig
    finally:
        await rig.aclose()
        await server.stop()


async def test_kill_9_of_the_leader_during_a_burst_loses_nothing(single: ChaosRig) -> None:
    run = await leader_kill(
        single,
        burst=BURST,
        controllers=CONTROLLERS,
        lease_ttl=LEASE_TTL,
        workers=WORKERS,
        concurrency=CONCURRENCY,
    )
    print(f"\n{run}")
    assert run.acked == BURST
    assert run.done_at_kill < BURST, "the kill came after the burst"
    assert run.successor != run.leader and run.successor in CONTROLLERS
    # The lease TTL plus one renew interval, plus slack for the server's expiry
    # timer and the event's delivery on a loaded machine (as test_controller_ha).
    assert run.takeover <= LEASE_TTL + INTERVAL + 1.0, run.takeover
    # The killed leader was dispatching, and had tasks out on workers when it
    # died: another controller ran those again once they were redelivered.
    assert run.killed_sent > 0 and run.killed_resent > 0
    # Every result stored; every effect exactly once after deduplication by id.
    assert run.results == BURST and run.lost == 0
    assert run.effects == BURST and run.strays == 0
    # Re-executions: what the dead controller had out on workers, at most.
    assert run.killed_resent <= run.raw_duplicates <= WORKERS * CONCURRENCY


# --- one server of three ------------------------------------------------------------


@pytest.fixture
def cluster(pki: FabricPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three servers over TLS routes, each with HTTPS monitoring (``/connz``)."""
    cluster = NatsCluster(pki.dir, tmp_path_factory.mktemp("chaos-cluster"), probe=pki["ctl-1"])
    for server in cluster.servers:
        server.settings = dataclasses.replace(server.settings, monitor_port=free_port())
    run_sync(cluster.start())
    try:
        yield cluster
    finally:
        run_sync(cluster.stop())


@pytest.fixture
async def clustered(
    pki: FabricPki, tmp_path: Path, cluster: NatsCluster
) -> AsyncIterator[ChaosRig]:
    rig = ChaosRig(pki, tmp_path, cluster.urls)
    try:
        yield rig
    finally:
        await rig.aclose()


def nothing_lost(phase: ServerLoss, controllers: int = 2) -> None:
    print(f"\n{phase}")
    assert phase.acked > 0
    assert not phase.lost, phase.lost[:5]
    assert not phase.missing, phase.missing[:5]
    if phase.phase != "return":
        assert phase.dispatching == controllers, "a controller stopped dispatching"


async def test_kill_9_of_a_nats_server_under_load_loses_no_acknowledged_task(
    clustered: ChaosRig, cluster: NatsCluster
) -> None:
    load = ClusterLoad(clustered, cluster, lease_ttl=LEASE_TTL)
    # The hardest server to lose: the TASKS stream's leader; the submitter sits on it.
    await load.start()
    victim = await load.stream_leader(TASKS_STREAM)
    await load.connect_submitter(victim)

    first = await load.lose(victim, "a")
    nothing_lost(first)
    assert "op-1" in first.clients_on_it and load.reconnects >= 1
    assert load.submit_nc is not None and load.submit_nc.connected_url is not None
    assert load.submit_nc.connected_url.port != victim.settings.port

    # The server comes back under load: it rejoins and its replicas catch up.
    back = await load.rejoin(victim, "b", (TASKS_STREAM, f"KV_{RECORDS_BUCKET}"))
    nothing_lost(back)
    # Then another server goes (of the two, the one more clients sit on): what
    # the returned one holds must now carry the load.
    second = load.busiest(s for s in cluster.servers if s is not victim)
    try:
        nothing_lost(await load.lose(second, "c", phase="kill after the return"))
    finally:
        if not second.running:
            await second.start()
    # No effect of a task nobody submitted (one not acked may still have run).
    assert load.strays() == set()
    # Every acknowledged task's final event is in EVENTS too: the dispatcher
    # waits for it to be stored before the ack, across every server loss.
    events = await stored_events(await clustered.admin(), "events.task.completed")
    assert load.submitter is not None
    without_event = [i for i in load.submitter.acked if not events[i]]
    assert without_event == [], f"{len(without_event)} acknowledged tasks have no stored event"
