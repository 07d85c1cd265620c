"""Observed agent state in KV: written on change only, read by a controller just started."""

from __future__ import annotations

from datetime import UTC, datetime

import nats.js.errors
from fleetfixtures import FakeNode, beating, controller_config, create, leader_of, running, until
from nats.aio.msg import Msg
from natsfixtures import Clients, FabricPki

from fabric.controller.observed import ObservedEntry, changes
from fabric.controller.reconcile import Place
from fabric.controller.service import Controller
from fabric.controller.streams import OBSERVED_BUCKET
from fabric.tokens import TokenIssuer, TokenVerifier
from schemas import subjects
from schemas.agent import AgentState
from schemas.codec import decode, encode
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.node import AgentSummary


def entry(node_id: str, *agents: AgentSummary) -> ObservedEntry:
    return ObservedEntry(node_id=node_id, agents=list(agents), updated_at=datetime.now(UTC))


def test_changes_names_only_nodes_whose_report_differs() -> None:
    web = AgentSummary("web", AgentState.RUNNING, 3, 100)
    stored = {"n1": entry("n1", web), "n2": entry("n2")}
    live = {
        "n1": {"web": web},  # same: nothing to write
        "n2": {"web": AgentSummary("web", AgentState.STARTING, 4)},  # changed
        "n3": {},  # never stored: written, even empty
    }
    assert changes(live, stored) == {
        "n2": [AgentSummary("web", AgentState.STARTING, 4)],
        "n3": [],
    }
    # A restart (new pid) or a new state is a change; nodes not heard from are left alone.
    assert changes({"n1": {"web": AgentSummary("web", AgentState.RUNNING, 3, 101)}}, stored)
    assert changes({}, stored) == {}


async def test_stored_on_change_only_and_known_to_a_new_leader(
    pki: FabricPki, connect_as: Clients
) -> None:
    verifier = TokenVerifier.from_files(pki.dir / "signing.pub")
    issuer = TokenIssuer.from_file(pki.dir / "signing.key", "alice")
    admin = await connect_as("ctl-1")
    beats = 0

    async def on_beat(_msg: Msg) -> None:
        nonlocal beats
        beats += 1

    await admin.subscribe(subjects.node_heartbeat("n1"), cb=on_beat)
    a = Controller(await connect_as("ctl-1"), controller_config(pki, "ctl-o1"))
    node = FakeNode(await connect_as("n1"), "n1", verifier)
    async with running(a):
        await until(lambda: leader_of(a) is a, within=5)
        kv = await admin.jetstream().key_value(OBSERVED_BUCKET)

        async def stored() -> tuple[ObservedEntry, int] | None:
            try:
                got = await kv.get("n1")
            except nats.js.errors.KeyNotFoundError:
                return None
            assert got.value is not None and got.revision is not None
            return decode(got.value, ObservedEntry), got.revision

        def mirrored() -> list[str]:
            # The leader's own copy follows its writes; KV is read after it.
            assert a.observed is not None
            held = a.observed.items.get("n1")
            return [s.agent_id for s in held[0].agents] if held else []

        async with beating(node):
            await create(await connect_as("op-1"), issuer, "seen")
            await node.wait(lambda: "seen" in node.agents)
            await until(lambda: mirrored() == ["seen"], within=5)
            found = await stored()
            assert found is not None
            first, revision = found
            assert first.agents == [AgentSummary("seen", AgentState.RUNNING, node.agents["seen"])]

            # Steady heartbeats (and the passes between them) write nothing.
            target = beats + 6
            await until(lambda: beats >= target, within=5)
            assert (await stored()) == (first, revision)

            # A change is written once.
            node.agents["manual"] = 0  # placed by hand: reported, never swept
            await until(lambda: mirrored() == ["manual", "seen"], within=5)
            found = await stored()
            assert found is not None
            assert [s.agent_id for s in found[0].agents] == ["manual", "seen"]
            assert found[1] > revision
            node.beating = False  # from here on, nobody hears from n1

    # A controller that has just started and never heard n1 knows what runs there.
    b = Controller(
        await connect_as("ctl-1"), controller_config(pki, "ctl-o2", reconcile_interval=3600)
    )
    async with running(b):
        await until(lambda: leader_of(b) is b, within=5)
        assert "n1" not in b.live
        work = b.plan_pass()
        assert [c for c in work.plan.commands if c.node_id == "n1"] == []
        viewer = await connect_as("view-1")
        ask = DiscoverRequest(what="agents", ids=["seen"])
        msg = await viewer.request(subjects.DISCOVER, encode(ask), timeout=2)
        reply = decode(msg.data, DiscoverReply)
        assert [(s.agent_id, s.node_id, s.state) for s in reply.agents] == [
            ("seen", "n1", AgentState.RUNNING)
        ]
        # Without the stored state it would ask n1 to start "seen" again.
        assert b.observed is not None
        b.observed.items.clear()
        again = b.plan_pass()
        assert any(isinstance(c, Place) and c.agent_id == "seen" for c in again.plan.commands)
