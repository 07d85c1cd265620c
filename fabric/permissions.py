"""Role -> NATS publish/subscribe permissions (pure data, no I/O).

Every client certificate is mapped by the server (``verify_and_map``) to a user
whose name is the certificate's DN; that user's permissions come from the row of
:data:`ROLE_PERMISSIONS` for the certificate's role (its ``OU``). Rows marked
per-identity have ``{name}`` substituted with the identity's name, which for a
node is its ``node_id``: that is what lets a node publish heartbeats and
registrations under its own ``nodes.<node_id>.`` and nowhere else, so the
subject itself proves the sender.

The table (``<own>`` is the identity name; "replies" means allow_responses,
i.e. one reply to each request received unless the row says more, with no
publish right on inboxes):

controller
    publish and subscribe: every fabric family (``agents.>``, ``nodes.>``,
    ``tasks.>``, ``events.>``, ``fabric.>``), JetStream and KV (``$JS.API.>``,
    ``$JS.ACK.>``, ``$JS.EVENT.>``, ``$JS.FC.>``, ``$KV.>``) and ``$SRV.>``;
    publish to any ``_INBOX.>``, subscribe only ``_INBOX.<own>.>``; replies.
    Listed family by family rather than ``>`` so a new family is a deliberate
    change here.
node (per identity: ``<own>`` is the node_id)
    publish ``nodes.<own>.heartbeat``, ``nodes.<own>.register``,
    ``agents.*.status``, ``agents.*.logs``, ``events.agent.>``,
    ``events.node.>``, ``fabric.discover``; replies (command results, ``$SRV``
    answers). Subscribe ``nodes.<own>.commands``, ``agents.*.commands`` (it
    cannot know in advance which agents it will host), ``_INBOX.<own>.>`` (register
    and discover replies), ``$SRV.>``. No JetStream at all.
operator
    publish ``agents.*.commands``, ``nodes.*.commands``, ``tasks.*.queue``,
    ``tasks.*.direct`` (the at-most-once task path),
    ``fabric.discover``, ``fabric.api.>``, ``$SRV.>``, ``$JS.API.>``,
    ``$JS.FC.EVENTS.>``, ``$JS.FC.KV_fabric_tasks.>`` (flow control of
    event replays and of task-record watches); subscribe like viewer.
viewer
    publish ``fabric.discover``, ``$SRV.PING|INFO|STATS`` (and ``.>``), and
    read-only JetStream calls on stream ``EVENTS`` for replay; subscribe
    ``agents.*.status``, ``agents.*.logs``, ``nodes.*.heartbeat``,
    ``events.>``, ``_INBOX.<own>.>``.
worker
    publish ``events.task.>``; replies (task results, ``$SRV`` answers): up to
    256 to each request (``MAX_BATCH_ASSIGNMENTS``: a batch of assignments is
    answered in several messages as its tasks finish), each allowed for 24 h
    after its assignment since a task may run that long (nats-server's default
    window is 2 min; a config reload resets the tracking, so a reply pending
    across a reload is lost and the task is retried); subscribe
    ``agents.*.tasks``, ``tasks.*.direct``, ``_INBOX.<own>.>``, ``$SRV.>``.

Notes:

* Replies come back on each identity's own inboxes, ``_INBOX.<name>.>``
  (:func:`fabric.connect.connect` sets that prefix from the certificate's
  name): nobody may subscribe to the replies meant for another identity, so a
  worker cannot read an operator's API answers or a node's commands' replies.
* The operator's ``$JS.API.>`` is broad on purpose: submitting a task with an
  ack, reading EVENTS and KV all go through it, and narrowing it per stream
  would mean tracking every JetStream call nats-py makes. Operators are trusted
  people; viewers, nodes and workers get no such right.
* The viewer's JetStream rights are enough for an ordered (ack-none) consumer
  on ``EVENTS``: stream lookup and info, consumer create/info, pull next, flow
  control. It cannot ack, delete, purge or publish into any stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.ids import ID_PATTERN, is_valid_id
from schemas.task import MAX_BATCH_ASSIGNMENTS

__all__ = [
    "ID_PATTERN",
    "ROLE_PERMISSIONS",
    "Permissions",
    "RoleRow",
    "permissions_for",
    "subject_matches",
]

# Read-only JetStream calls on the EVENTS stream, enough for an ordered
# consumer replaying `events.>` (what `fabric events` does for a viewer).
_EVENTS_READ = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.INFO.EVENTS",
    "$JS.API.CONSUMER.CREATE.EVENTS",
    "$JS.API.CONSUMER.CREATE.EVENTS.>",
    "$JS.API.CONSUMER.INFO.EVENTS.>",
    "$JS.API.CONSUMER.MSG.NEXT.EVENTS.>",
    "$JS.FC.EVENTS.>",
)

_SRV_QUERY = (
    "$SRV.PING",
    "$SRV.PING.>",
    "$SRV.INFO",
    "$SRV.INFO.>",
    "$SRV.STATS",
    "$SRV.STATS.>",
)

_WATCH = (
    "agents.*.status",
    "agents.*.logs",
    "nodes.*.heartbeat",
    "events.>",
    "_INBOX.{name}.>",
)

_CONTROLLER_FAMILIES = (
    "agents.>",
    "nodes.>",
    "tasks.>",
    "events.>",
    "fabric.>",
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.EVENT.>",
    "$JS.FC.>",
    "$KV.>",
    "$SRV.>",
)


@dataclass(frozen=True, slots=True)
class Permissions:
    """Concrete allow lists for one user, ready to render into server config.

    ``allow_responses`` lets the user publish ``response_max`` replies (one
    unless said otherwise) to the reply subject of each request it received,
    without any publish right on ``_INBOX.>``: that is how nodes answer
    commands and workers answer tasks.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    response_expires: str | None = None
    """How long a reply stays allowed after the request (nats-server's default: 2 min)."""
    response_max: int = 1
    """How many replies one request allows (nats-server's default: 1)."""

    def may_publish(self, subject: str) -> bool:
        """True when some publish pattern covers ``subject`` (replies aside)."""
        return any(subject_matches(p, subject) for p in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        """True when some subscribe pattern covers ``subject``.

        A wildcard subscription is allowed by the server only if a pattern
        covers it as a whole, which is what ``subject_matches`` checks when
        ``subject`` itself holds wildcards.
        """
        return any(subject_matches(p, subject) for p in self.subscribe)

    def to_config(self) -> dict[str, object]:
        """The ``permissions`` map as nats-server config expects it."""
        out: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            # A bare `true` keeps the server's defaults (1 reply within 2 min).
            limits: dict[str, object] = {}
            if self.response_expires or self.response_max != 1:
                limits["max"] = self.response_max
            if self.response_expires:
                limits["expires"] = self.response_expires
            out["allow_responses"] = limits or True
        return out


@dataclass(frozen=True, slots=True)
class RoleRow:
    """One row of the role table; ``{name}`` in a pattern is the identity name."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    response_expires: str | None = None
    response_max: int = 1
    per_identity: bool = field(default=False)

    def bind(self, name: str) -> Permissions:
        def fill(patterns: Iterable[str]) -> tuple[str, ...]:
            return tuple(p.replace("{name}", name) for p in patterns)

        return Permissions(
            publish=fill(self.publish),
            subscribe=fill(self.subscribe),
            allow_responses=self.allow_responses,
            response_expires=self.response_expires,
            response_max=self.response_max,
        )


ROLE_PERMISSIONS: dict[str, RoleRow] = {
    "controller": RoleRow(
        # Publish to any inbox (the controller answers whoever asks, also
        # for requests it did not receive itself); read only its own.
        publish=(*_CONTROLLER_FAMILIES, "_INBOX.>"),
        subscribe=(*_CONTROLLER_FAMILIES, "_INBOX.{name}.>"),
        allow_responses=True,
    ),
    "node": RoleRow(
        publish=(
            "nodes.{name}.heartbeat",
            "nodes.{name}.register",
            "agents.*.status",
            "agents.*.logs",
            "events.agent.>",
            "events.node.>",
            "fabric.discover",
        ),
        subscribe=(
            "nodes.{name}.commands",
            "agents.*.commands",
            "_INBOX.{name}.>",
            "$SRV.>",
        ),
        allow_responses=True,
        per_identity=True,
    ),
    "operator": RoleRow(
        publish=(
            "agents.*.commands",
            "nodes.*.commands",
            "tasks.*.queue",
            "tasks.*.direct",
            "fabric.discover",
            "fabric.api.>",
            "$SRV.>",
            "$JS.API.>",
            "$JS.FC.EVENTS.>",
            # Flow-control replies of a watch on the task records (`fabric task
            # submit --wait`): without them the server stops the watch after a
            # few MB of record versions and the wait never sees the end.
            "$JS.FC.KV_fabric_tasks.>",
        ),
        subscribe=_WATCH,
    ),
    "viewer": RoleRow(
        publish=("fabric.discover", *_SRV_QUERY, *_EVENTS_READ),
        subscribe=_WATCH,
    ),
    "worker": RoleRow(
        publish=("events.task.>",),
        subscribe=("agents.*.tasks", "tasks.*.direct", "_INBOX.{name}.>", "$SRV.>"),
        allow_responses=True,
        # A task may run for hours; its result is the reply to the assignment.
        response_expires="24h",
        # A TaskBatch is answered in one TaskResults per group of tasks finished
        # together, so in the worst case once per assignment.
        response_max=MAX_BATCH_ASSIGNMENTS,
    ),
}


def permissions_for(role: str, name: str) -> Permissions:
    """Permissions of identity ``name`` holding ``role``.

    Raises ``ValueError`` for an unknown role or a name that is not a valid id
    (the name becomes a subject token for per-identity rows, and a bad one must
    never widen a pattern, e.g. ``*`` or ``a.b``).
    """
    # Checked here, not only in the PKI: the name becomes a subject token.
    if not is_valid_id(name):
        raise ValueError(f"invalid identity name {name!r}: must match {ID_PATTERN}")
    try:
        row = ROLE_PERMISSIONS[role]
    except KeyError:
        known = ", ".join(sorted(ROLE_PERMISSIONS))
        raise ValueError(f"unknown role {role!r}: expected one of {known}") from None
    return row.bind(name)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: does ``pattern`` cover ``subject``?

    ``*`` matches one token, ``>`` one or more trailing tokens. When
    ``subject`` holds wildcards itself (a subscription), it is covered only if
    every subject it could match is covered: ``>`` in the subject needs ``>``
    in the pattern, ``*`` needs ``*`` or ``>``.
    """
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        s = s_tokens[i]
        if s == ">":
            return False
        if p == "*":
            continue
        if p != s:
            return False
    return len(p_tokens) == len(s_tokens)
