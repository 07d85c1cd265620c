"""Every role by every subject family, publish and subscribe, against a real server.

The expectation is the table below, written from the design (DESIGN.md,
Security; the role descriptions in issue 8), NOT derived from
``fabric.permissions``: if the code drifts from the design, this fails.

Each cell is two characters: ``p`` = may publish, ``s`` = may subscribe,
``-`` = refused. The node column is node ``n1``: ``nodes.n1.*`` are its own
subjects, ``nodes.n2.*`` another node's.

Observation, without sleeping: a publish is allowed iff a controller
watching the subject receives it before a marker sent after it on the same
connection (NATS keeps one connection's order); refused iff the publisher's
``error_cb`` reports the permissions violation and the watcher saw nothing.
A subscription is checked the same way the other round: the controller
publishes to every subject, then a marker to the subscriber's inbox.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg
from natsfixtures import Clients, ErrorLog

from fabric.pki import ROLES

TABLE = """
subject                    controller node operator viewer worker
agents.x.commands          ps         -s   p-       --     --
agents.x.status            ps         p-   -s       -s     --
agents.x.logs              ps         p-   -s       -s     --
agents.x.tasks             ps         --   --       --     -s
nodes.n1.commands          ps         -s   p-       --     --
nodes.n1.heartbeat         ps         p-   -s       -s     --
nodes.n1.register          ps         p-   --       --     --
nodes.n2.commands          ps         --   p-       --     --
nodes.n2.heartbeat         ps         --   -s       -s     --
nodes.n2.register          ps         --   --       --     --
tasks.build.queue          ps         --   p-       --     --
tasks.build.direct         ps         --   p-       --     -s
events.agent.started       ps         p-   -s       -s     --
events.node.lost           ps         p-   -s       -s     --
events.task.done           ps         --   -s       -s     p-
events.controller.leader   ps         --   -s       -s     --
fabric.discover            ps         p-   p-       p-     --
fabric.api.create          ps         --   p-       --     --
$SRV.PING                  ps         -s   p-       p-     -s
$JS.API.INFO               ps         --   p-       p-     --
$KV.fabric_nodes.x         ps         --   --       --     --
"""

IDENTITY = {
    "controller": "ctl-1",
    "node": "n1",
    "operator": "op-1",
    "viewer": "view-1",
    "worker": "work-1",
}


def _parse(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = [line.split() for line in table.strip().splitlines()]
    roles = lines[0][1:]
    cells = {row[0]: dict(zip(roles, row[1:], strict=True)) for row in lines[1:]}
    return roles, cells


ROLE_COLUMNS, CELLS = _parse(TABLE)
SUBJECTS = list(CELLS)


def allowed(role: str, right: str) -> set[str]:
    """Subjects ``role`` may publish (``right='p'``) or subscribe to (``'s'``)."""
    return {subject for subject, row in CELLS.items() if right in row[role]}


def test_the_table_covers_every_role_and_is_well_formed() -> None:
    assert set(ROLE_COLUMNS) == set(ROLES) == set(IDENTITY)
    for subject, row in CELLS.items():
        for role, cell in row.items():
            assert len(cell) == 2 and cell[0] in "p-" and cell[1] in "s-", (subject, role)


class _Seen:
    """Messages received on any of several subscriptions, with a wait for the marker."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.marker = asyncio.Event()

    async def handle(self, msg: Msg) -> None:
        if msg.data == b"marker":
            self.marker.set()
        else:
            self.messages.append((msg.subject, msg.data))


@pytest.mark.parametrize("role", ROLE_COLUMNS)
async def test_publish_rights_are_exactly_the_table(connect_as: Clients, role: str) -> None:
    watcher = await connect_as("ctl-1")
    seen = _Seen()
    marker = "events.task.done" if role == "worker" else "fabric.discover"
    for subject in SUBJECTS:
        await watcher.subscribe(subject, cb=seen.handle)
    await watcher.flush()

    errors = ErrorLog()
    nc = await connect_as(IDENTITY[role], error_cb=errors)
    for subject in SUBJECTS:
        await nc.publish(subject, b"probe")
    await nc.publish(marker, b"marker")
    await nc.flush()
    async with asyncio.timeout(5):
        await seen.marker.wait()

    expected = allowed(role, "p")
    assert {s for s, _ in seen.messages} == expected
    for subject in SUBJECTS:
        quoted = f'permissions violation for publish to "{subject}"'
        if subject in expected:
            assert not errors.matching(quoted), subject
        else:
            await errors.wait_for(quoted)


@pytest.mark.parametrize("role", ROLE_COLUMNS)
async def test_subscribe_rights_are_exactly_the_table(connect_as: Clients, role: str) -> None:
    errors = ErrorLog()
    nc = await connect_as(IDENTITY[role], error_cb=errors)
    seen = _Seen()
    for subject in SUBJECTS:
        await nc.subscribe(subject, cb=seen.handle)
    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=seen.handle)
    await nc.flush()
    expected = allowed(role, "s")
    for subject in SUBJECTS:
        if subject not in expected:
            await errors.wait_for(f'permissions violation for subscription to "{subject}"')

    ctl = await connect_as("ctl-1")
    for subject in SUBJECTS:
        await ctl.publish(subject, b"probe")
    await ctl.publish(inbox, b"marker")
    await ctl.flush()
    async with asyncio.timeout(5):
        await seen.marker.wait()

    assert {s for s, _ in seen.messages} == expected
    for subject in expected:
        assert not errors.matching(f'subscription to "{subject}"'), subject
