"""When the leader runs a pass: on a change of what it reads, else once a second.

Its own module, so its server holds no other test's deployments: the fleet
here is quiet once its one replica runs.
"""

from __future__ import annotations

from fleetfixtures import FakeNode, beating, controller_config, create, leader_of, running, until
from natsfixtures import Clients, FabricPki

from fabric.controller.service import Controller
from fabric.tokens import TokenIssuer, TokenVerifier


async def test_a_pass_runs_when_an_input_changes_or_a_second_went_by(
    pki: FabricPki, connect_as: Clients
) -> None:
    # The loop never runs a pass by itself here: the test asks _pass_due and runs them.
    ctl = Controller(
        await connect_as("ctl-1"), controller_config(pki, "ctl-p", reconcile_interval=3600)
    )
    node = FakeNode(await connect_as("n1"), "n1", TokenVerifier.from_files(pki.dir / "signing.pub"))
    issuer = TokenIssuer.from_file(pki.dir / "signing.key", "alice")
    async with running(ctl):
        await until(lambda: leader_of(ctl) is ctl, within=5)
        async with beating(node):
            await create(await connect_as("op-1"), issuer, "calm")
            assert ctl.deployments is not None
            mirror = ctl.deployments
            await until(lambda: "calm" in mirror.items, within=5)
            assert ctl._pass_due()
            await ctl.reconcile_once()  # places "calm" on n1
            await node.wait(lambda: "calm" in node.agents)
            await until(lambda: "calm" in ctl.live["n1"].agents, within=5)
            await settle(ctl)  # sees it running, stores the report, sees that stored

            # Nothing changed since: heartbeats keep coming, no pass is due.
            beats = node.beats
            await until(lambda: node.beats >= beats + 2, within=5)
            assert not ctl._pass_due()

            # A changed report is a reason for a pass...
            node.agents["by-hand"] = 0
            await until(ctl._pass_due, within=5)
            await settle(ctl)
            # ...and so is a second of quiet.
            await until(ctl._pass_due, within=2)


async def settle(ctl: Controller) -> None:
    """Run passes until none is due (each pass's own writes call for one more)."""
    for _ in range(5):
        await ctl.reconcile_once()
        if not ctl._pass_due():
            return
    raise AssertionError("passes keep being due")
