"""Commands to node agents and their replies.

A command is one JSON object whose ``op`` field names the operation; every
command carries the caller's signed token (see ``fabric.tokens``). Agent
commands go to ``agents.<agent_id>.commands``, node commands to
``nodes.<node_id>.commands``. Each gets exactly one reply: a
:class:`CommandResult` (``"kind": "result"``) or an
:class:`~schemas.errors.ErrorReply` (``"kind": "error"``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.agent import AgentSpec, AgentStatus, SignalName
from schemas.common import Seconds, Text, Timestamp
from schemas.ids import AgentId, NodeId

__all__ = [
    "AGENT_OPS",
    "NODE_OPS",
    "AgentCommand",
    "CommandResult",
    "DrainNode",
    "ListAgents",
    "LogLinesResult",
    "NodeCommand",
    "PauseAgent",
    "PlaceAgent",
    "RemoveAgent",
    "RestartAgent",
    "ResumeAgent",
    "ShutdownNode",
    "SignalAgent",
    "StartAgent",
    "StatusAgent",
    "StopAgent",
    "TailLogs",
]

Token = Annotated[str, msgspec.Meta(max_length=8192, description="A signed command token (JWT).")]


class _Command(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="op", kw_only=True
):
    token: Token | None = None


class StopAgent(_Command, tag="stop"):
    """Stop gracefully: stop signal, then SIGKILL after ``timeout`` (default: the spec's)."""

    timeout: Seconds | None = None


class StartAgent(_Command, tag="start"):
    """Start an agent that is stopped, exited or failed."""


class RestartAgent(_Command, tag="restart"):
    pass


class SignalAgent(_Command, tag="signal"):
    signal: SignalName


class PauseAgent(_Command, tag="pause"):
    pass


class ResumeAgent(_Command, tag="resume"):
    pass


class StatusAgent(_Command, tag="status"):
    pass


class TailLogs(_Command, tag="logs"):
    """The last ``lines`` of a stream; with ``follow``, also publish new lines of
    both streams on ``agents.<agent_id>.logs`` for that many seconds (ask again
    to keep them coming)."""

    stream: Literal["stdout", "stderr"] = "stdout"
    lines: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    follow: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    since: Timestamp | None = None
    """Only lines written after about this time (to within one metrics tick)."""


AgentCommand = (
    StopAgent
    | StartAgent
    | RestartAgent
    | SignalAgent
    | PauseAgent
    | ResumeAgent
    | StatusAgent
    | TailLogs
)


class PlaceAgent(_Command, tag="place"):
    """Run ``spec`` on this node at placement ``epoch`` (replaces an older epoch)."""

    spec: AgentSpec
    epoch: Annotated[int, msgspec.Meta(ge=0)] = 0


class RemoveAgent(_Command, tag="remove"):
    """Stop and forget an agent.

    Refused with ``stale_epoch`` when ``epoch`` is older than the node's copy.
    """

    agent_id: AgentId
    epoch: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ListAgents(_Command, tag="list"):
    pass


class DrainNode(_Command, tag="drain"):
    """Stop every agent gracefully and accept no new placements."""


class ShutdownNode(_Command, tag="shutdown"):
    """Stop the node agent: ``drain`` stops its agents, ``detach`` leaves them for re-adoption."""

    mode: Literal["drain", "detach"] = "drain"


NodeCommand = PlaceAgent | RemoveAgent | ListAgents | DrainNode | ShutdownNode

AGENT_OPS: frozenset[str] = frozenset(
    c.__struct_config__.tag
    for c in AgentCommand.__args__  # type: ignore[attr-defined]
)
NODE_OPS: frozenset[str] = frozenset(
    c.__struct_config__.tag
    for c in NodeCommand.__args__  # type: ignore[attr-defined]
)


class LogLinesResult(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    stream: Literal["stdout", "stderr"]
    lines: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=65536)]], msgspec.Meta(max_length=10_000)
    ]


class CommandResult(
    msgspec.Struct,
    forbid_unknown_fields=True,
    frozen=True,
    tag="result",
    tag_field="kind",
    kw_only=True,
):
    """The reply to a command that was carried out."""

    op: Annotated[str, msgspec.Meta(max_length=32)]
    node_id: NodeId
    agent_id: AgentId | None = None
    status: AgentStatus | None = None
    agents: Annotated[list[AgentStatus], msgspec.Meta(max_length=100_000)] = []
    logs: LogLinesResult | None = None
    message: Text = ""
