"""Turning command bytes into supervisor calls and reply bytes.

This is the whole decision path of the node agent's NATS face, with no NATS
in it: decode into a typed command, check the token's scope for the op and
its target, call the supervisor, encode a :class:`CommandResult` or an
:class:`ErrorReply`. Every input gets exactly one reply; every refusal is
counted by its code; a refused command changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from fabric.audit import Refusal
from fabric.spec_policy import NodeSpecPolicy, check_on_node
from fabric.tokens import Claims, TokenVerifier
from schemas import subjects
from schemas.agent import AgentSpec, AgentStatus, SignalName
from schemas.codec import decode_agent_command, decode_node_command, encode
from schemas.command import (
    AgentCommand,
    CommandResult,
    DrainNode,
    ListAgents,
    LogLinesResult,
    NodeCommand,
    PauseAgent,
    PlaceAgent,
    RemoveAgent,
    RestartAgent,
    ResumeAgent,
    ShutdownNode,
    SignalAgent,
    StartAgent,
    StatusAgent,
    StopAgent,
    TailLogs,
)
from schemas.errors import ContractError, ErrorCode
from schemas.ids import validate_id

__all__ = ["OP_SCOPES", "CommandHandler", "SupervisorControl"]

# The scope a token needs for each op.
OP_SCOPES: dict[type, str] = {
    StopAgent: "agents:stop",
    StartAgent: "agents:run",
    RestartAgent: "agents:run",
    SignalAgent: "agents:signal",
    PauseAgent: "agents:signal",
    ResumeAgent: "agents:signal",
    StatusAgent: "read",
    TailLogs: "read",
    PlaceAgent: "agents:run",
    RemoveAgent: "agents:stop",
    ListAgents: "read",
    DrainNode: "nodes:admin",
    ShutdownNode: "nodes:admin",
}


class SupervisorControl(Protocol):
    """What the command path needs from the supervisor."""

    async def place(self, spec: AgentSpec, epoch: int = 0) -> AgentStatus: ...
    async def start(self, agent_id: str) -> AgentStatus: ...
    async def stop(self, agent_id: str, timeout: float | None = None) -> AgentStatus: ...  # noqa: ASYNC109
    async def restart(self, agent_id: str) -> AgentStatus: ...
    async def signal(self, agent_id: str, signame: SignalName) -> AgentStatus: ...
    async def pause(self, agent_id: str) -> AgentStatus: ...
    async def resume(self, agent_id: str) -> AgentStatus: ...
    async def remove(self, agent_id: str) -> AgentStatus: ...
    def status(self, agent_id: str) -> AgentStatus: ...
    def statuses(self) -> list[AgentStatus]: ...
    def tail_logs(
        self,
        agent_id: str,
        stream: Literal["stdout", "stderr"],
        lines: int,
        since: float | None = None,
    ) -> list[str]: ...


class CommandHandler:
    """Decodes, authorises and carries out commands; returns reply bytes.

    ``on_drain`` and ``on_shutdown`` are the node-level actions the service
    owns (they outlive a single reply); ``on_accepted`` hears who asked for
    what, so the service can write it into the events it publishes;
    ``on_refused`` hears every refusal (code, subject, op, who claims to ask,
    target) so the service can audit it. ``policy`` is what this node lets a
    spec ask for (fabric.spec_policy); every placed spec is checked against it.
    """

    def __init__(
        self,
        node_id: str,
        supervisor: SupervisorControl,
        verifier: TokenVerifier,
        *,
        on_drain: Callable[[], Awaitable[None]],
        on_shutdown: Callable[[Literal["drain", "detach"]], Awaitable[None]],
        on_accepted: Callable[[str, str | None, Claims], None] | None = None,
        on_follow_logs: Callable[[str, float], None] | None = None,
        on_refused: Callable[[Refusal], None] | None = None,
        max_bytes: int = 256 * 1024,
        policy: NodeSpecPolicy | None = None,
    ) -> None:
        self._node_id = validate_id(node_id, "node id")
        self._sup = supervisor
        self._verifier = verifier
        self._on_drain = on_drain
        self._on_shutdown = on_shutdown
        self._on_accepted = on_accepted
        self._on_follow_logs = on_follow_logs
        self._on_refused = on_refused
        self._max_bytes = max_bytes
        self._policy = policy or NodeSpecPolicy()
        self.draining = False
        self.refused: Counter[ErrorCode] = Counter()
        self.accepted: Counter[str] = Counter()

    def _refuse(
        self,
        exc: ContractError,
        *,
        subject: str,
        data: bytes,
        target: str | None,
        claims: Claims | None,
    ) -> bytes:
        self.refused[exc.code] += 1
        if self._on_refused is not None:
            self._on_refused(
                Refusal.of(
                    exc.code,
                    subject,
                    data,
                    target=target,
                    verified_by=claims.sub if claims is not None else None,
                )
            )
        return encode(exc.to_reply())

    def _authorise(self, command: AgentCommand | NodeCommand, agent_id: str | None) -> Claims:
        claims = self._verifier.verify(
            command.token, scope=OP_SCOPES[type(command)], agent=agent_id, node=self._node_id
        )
        op = type(command).__struct_config__.tag
        assert isinstance(op, str)
        self.accepted[op] += 1
        if self._on_accepted is not None:
            self._on_accepted(op, agent_id, claims)
        return claims

    async def agent_command(self, agent_id: str, data: bytes) -> bytes:
        """Handle a message from ``agents.<agent_id>.commands``."""
        claims: Claims | None = None
        try:
            validate_id(agent_id, "agent id")
            command = decode_agent_command(data, max_bytes=self._max_bytes)
            self._sup.status(agent_id)  # NOT_FOUND before the token is spent
            claims = self._authorise(command, agent_id)
            return encode(await self._run_agent_command(agent_id, command))
        except ContractError as exc:
            subject = f"agents.{agent_id}.commands"
            return self._refuse(exc, subject=subject, data=data, target=agent_id, claims=claims)

    async def _run_agent_command(self, agent_id: str, command: AgentCommand) -> CommandResult:
        op = command.__struct_config__.tag
        assert isinstance(op, str)

        def result(status: AgentStatus, **extra: object) -> CommandResult:
            return CommandResult(
                op=op, node_id=self._node_id, agent_id=agent_id, status=status, **extra
            )  # type: ignore[arg-type]

        match command:
            case StopAgent(timeout=timeout):
                return result(await self._sup.stop(agent_id, timeout))
            case StartAgent():
                self._refuse_while_draining()
                return result(await self._sup.start(agent_id))
            case RestartAgent():
                self._refuse_while_draining()
                return result(await self._sup.restart(agent_id))
            case SignalAgent(signal=signame):
                return result(await self._sup.signal(agent_id, signame))
            case PauseAgent():
                return result(await self._sup.pause(agent_id))
            case ResumeAgent():
                return result(await self._sup.resume(agent_id))
            case StatusAgent():
                return result(self._sup.status(agent_id))
            case TailLogs(stream=stream, lines=lines, follow=follow, since=since):
                when = None if since is None else since.timestamp()
                text = self._sup.tail_logs(agent_id, stream, lines, when)
                if follow is not None and self._on_follow_logs is not None:
                    self._on_follow_logs(agent_id, follow)
                return result(self._sup.status(agent_id), logs=LogLinesResult(stream, text))
        raise ContractError(ErrorCode.UNKNOWN_OP, f"op {op!r} is not handled here")

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise ContractError(ErrorCode.INVALID_STATE, "node is draining: it starts nothing new")

    async def node_command(self, data: bytes) -> bytes:
        """Handle a message from ``nodes.<node_id>.commands``."""
        claims: Claims | None = None
        target = None
        try:
            command = decode_node_command(data, max_bytes=self._max_bytes)
            if isinstance(command, PlaceAgent):
                target = command.spec.name
            elif isinstance(command, RemoveAgent):
                target = command.agent_id
                self._sup.status(target)
            claims = self._authorise(command, target)
            return encode(await self._run_node_command(command))
        except ContractError as exc:
            subject = subjects.node_commands(self._node_id)
            return self._refuse(exc, subject=subject, data=data, target=target, claims=claims)

    async def _run_node_command(self, command: NodeCommand) -> CommandResult:
        op = command.__struct_config__.tag
        assert isinstance(op, str)
        node_id = self._node_id
        match command:
            case PlaceAgent(spec=spec, epoch=epoch):
                check_on_node(spec, self._policy)  # before anything is stored or spawned
                self._refuse_while_draining()
                self._refuse_stale(spec.name, epoch)
                status = await self._sup.place(spec, epoch)
                return CommandResult(op=op, node_id=node_id, agent_id=spec.name, status=status)
            case RemoveAgent(agent_id=agent_id, epoch=epoch):
                if epoch is not None:
                    self._refuse_stale(agent_id, epoch)
                status = await self._sup.remove(agent_id)
                return CommandResult(op=op, node_id=node_id, agent_id=agent_id, status=status)
            case ListAgents():
                return CommandResult(op=op, node_id=node_id, agents=self._sup.statuses())
            case DrainNode():
                self.draining = True
                await self._on_drain()
                return CommandResult(
                    op=op, node_id=node_id, agents=self._sup.statuses(), message="drained"
                )
            case ShutdownNode(mode=mode):
                await self._on_shutdown(mode)
                return CommandResult(op=op, node_id=node_id, message=f"shutting down ({mode})")
        raise ContractError(ErrorCode.UNKNOWN_OP, f"op {op!r} is not handled here")

    def _refuse_stale(self, agent_id: str, epoch: int) -> None:
        try:
            current = self._sup.status(agent_id).epoch
        except ContractError:
            return
        if epoch < current:
            raise ContractError(
                ErrorCode.STALE_EPOCH,
                f"agent {agent_id} runs at epoch {current} here; epoch {epoch} is older",
            )
