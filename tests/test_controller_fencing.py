"""Leader writes are fenced by the lease: a deposed leader's late pass changes nothing.

Two in-process controllers on one real server. Their loops are "paused"
(a reconcile interval of an hour): the test runs each pass by hand, so it
can stop controller A between deciding and writing, the way a SIGSTOP or a
long GC pause would, while B takes the lease over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from fleetfixtures import FakeNode, beating, controller_config, create, leader_of, running, until
from natsfixtures import Clients, FabricPki

from fabric.controller.lease import NotLeader
from fabric.controller.reconcile import Place, Remove
from fabric.controller.registry import read
from fabric.controller.service import Controller
from fabric.tokens import TokenIssuer, TokenVerifier
from schemas.api import DeploymentRecord

PAUSED = 3600.0  # a reconcile interval no test outlives: passes are run by hand


@contextlib.asynccontextmanager
async def node(pki: FabricPki, connect_as: Clients, node_id: str) -> AsyncIterator[FakeNode]:
    """A fake node registered (a controller must be running) and heartbeating."""
    verifier = TokenVerifier.from_files(pki.dir / "signing.pub")
    async with beating(FakeNode(await connect_as(node_id), node_id, verifier)) as fake:
        yield fake


async def paused(pki: FabricPki, connect_as: Clients, name: str) -> Controller:
    """A controller whose loop never runs a pass by itself."""
    config = controller_config(pki, name, reconcile_interval=PAUSED)
    return Controller(await connect_as("ctl-1"), config)


def issuer(pki: FabricPki) -> TokenIssuer:
    return TokenIssuer.from_file(pki.dir / "signing.key", "alice")


async def _frozen() -> bool:
    await asyncio.Event().wait()  # a paused process: this renewal never comes back
    return False


async def test_a_frozen_leaders_late_write_is_refused(
    pki: FabricPki, connect_as: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await paused(pki, connect_as, "ctl-a")
    b = await paused(pki, connect_as, "ctl-b")
    async with running(a), node(pki, connect_as, "n1") as n1:
        await until(lambda: leader_of(a) is a, within=5)
        async with running(b):
            await create(await connect_as("op-1"), issuer(pki), "late")
            mirror = a.deployments
            assert mirror is not None
            await until(lambda: "late" in mirror.items, within=5)

            # A decides to place "late" on n1, then freezes before writing.
            stale = a.plan_pass()
            placed = [c for c in stale.plan.commands if isinstance(c, Place)]
            assert [(c.node_id, c.agent_id) for c in placed] == [("n1", "late")]
            assert a.lease is not None
            monkeypatch.setattr(a.lease, "renew", _frozen)
            await until(lambda: leader_of(a, b) is b, within=5)

            # A wakes up and carries its plan out: nothing is written or sent.
            # The record is untouched since A read it, so compare-and-set alone
            # would have let this write through: only the fence stops it.
            assert b.deployments is not None
            revision = b.deployments.items["late"][1]
            with pytest.raises(NotLeader):
                await a.carry_out(stale)
            assert b._buckets is not None
            stored = await read(b._buckets.agents, "late", DeploymentRecord)
            assert stored is not None
            assert stored[1] == revision
            assert stored[0].replicas == []

            # B, the real leader, places it; n1 only ever hears from B.
            await b.reconcile_once()
            await n1.wait(lambda: "late" in n1.agents)
            assert set(n1.senders) == {"ctl-b"}
            stored = await read(b._buckets.agents, "late", DeploymentRecord)
            assert stored is not None
            assert [(p.node_id, p.epoch) for p in stored[0].replicas] == [("n1", n1.agents["late"])]


async def test_a_deposed_leader_sends_no_commands(
    pki: FabricPki, connect_as: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass with nothing to write still fences its commands: here, the sweep
    # of a stale copy no deployment names.
    a = await paused(pki, connect_as, "ctl-c")
    b = await paused(pki, connect_as, "ctl-d")
    async with running(a), node(pki, connect_as, "n2") as n2:
        await until(lambda: leader_of(a) is a, within=5)
        n2.agents["ghost"] = 7
        await until(lambda: "ghost" in a.live["n2"].agents, within=5)
        async with running(b):
            stale = a.plan_pass()
            assert Remove("n2", "ghost", 7) in stale.plan.commands
            assert not any(d.changed for d in stale.plan.deployments)
            assert a.lease is not None
            monkeypatch.setattr(a.lease, "renew", _frozen)
            await until(lambda: leader_of(a, b) is b, within=5)
            with pytest.raises(NotLeader):
                await a.carry_out(stale)
            assert n2.senders == []
            await b.reconcile_once()
            await n2.wait(lambda: "ghost" not in n2.agents)
            assert n2.senders == ["ctl-d"]
