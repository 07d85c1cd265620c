"""A small async operator client: what every CLI verb that talks to the fabric uses.

:func:`open_client` finds the fabric (:mod:`fabric.env`), connects over mutual
TLS and yields a :class:`FabricClient`. Each call mints its own short-lived
token (a fresh ``jti`` every time, so nothing is ever replayed), sends one
request, decodes the reply with the contract's types and turns a refusal
into :class:`FabricError`, a :class:`~fabric.cli.CommandFailed` carrying the
refusal's stable code. Nothing here prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from cryptography import x509
from cryptography.x509.oid import NameOID
from nats.aio.client import Client

from fabric.cli import CommandFailed, UsageError
from fabric.connect import ConnectError, connect
from fabric.env import ENV_TOKEN_KEY, FabricEnv, NoFabricError, find_fabric
from fabric.tokens import TokenIssuer
from schemas import subjects
from schemas.agent import AgentSpec
from schemas.api import (
    ApiResult,
    CreateDeployment,
    DeleteDeployment,
    DeploymentRecord,
    GetDeployment,
    NodeRequest,
    ScaleDeployment,
    UpdateDeployment,
    replica_ids,
)
from schemas.codec import decode, decode_reply, encode
from schemas.command import (
    AgentCommand,
    CommandResult,
    PauseAgent,
    RestartAgent,
    ResumeAgent,
    SignalAgent,
    StartAgent,
    StatusAgent,
    StopAgent,
    TailLogs,
)
from schemas.discovery import DiscoverReply, DiscoverRequest
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.ids import is_valid_id

__all__ = [
    "DEFAULT_TIMEOUT",
    "FabricClient",
    "FabricError",
    "Target",
    "add_client_options",
    "check_name",
    "open_client",
    "resolve",
    "run_cli",
]

DEFAULT_TIMEOUT = 5.0
UNAVAILABLE_RETRY = 20.0
"""Seconds an API call is repeated while the controller says JetStream is unavailable."""
TOKEN_TTL = 60.0
_ISSUER = "fabric-cli"

# The scope each call needs; mirrors the controller's and the node's tables
# (fabric must not import node_agent, so the node's table is not reused).
_API_SCOPES = {
    "create": "agents:run",
    "update": "agents:run",
    "scale": "agents:run",
    "delete": "agents:stop",
    "get": "read",
    "list": "read",
    "drain": "nodes:admin",
    "cordon": "nodes:admin",
    "uncordon": "nodes:admin",
}
_OP_SCOPES: dict[type, str] = {
    StopAgent: "agents:stop",
    StartAgent: "agents:run",
    RestartAgent: "agents:run",
    SignalAgent: "agents:signal",
    PauseAgent: "agents:signal",
    ResumeAgent: "agents:signal",
    StatusAgent: "read",
    TailLogs: "read",
}


class FabricError(CommandFailed):
    """The fabric refused a request; ``code`` is the contract's stable error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _cert_name(cert: Path) -> str | None:
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _who(env: FabricEnv) -> str:
    """The token subject: the operator certificate's CN, else the login name."""
    name = _cert_name(env.cert)
    if name:
        return name
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return os.environ.get("USER") or "operator"


def _target(request: msgspec.Struct) -> tuple[str | None, str | None]:
    """(agent, node) a token for this API request must be bound to, as the controller checks."""
    if isinstance(request, CreateDeployment | UpdateDeployment):
        return request.deployment.name, None
    if isinstance(request, ScaleDeployment | DeleteDeployment | GetDeployment):
        return request.name, None
    if isinstance(request, NodeRequest):
        return None, request.node_id
    return None, None


def _not_eof_noise(record: logging.LogRecord) -> bool:
    # asyncio's TLS transport logs this warning whenever the server hangs up
    # on a closing nats-py connection; it is harmless, and a CLI must not print
    # it after every command.
    return "eof_received()" not in record.getMessage()


async def _quiet(_exc: Exception) -> None:
    # Connection trouble after the first connect surfaces as a failed request;
    # nats-py's own reports would only add lines to stderr.
    return None


class FabricClient:
    """One connection to the fabric; every method is one request and one reply."""

    def __init__(
        self,
        nc: Client,
        env: FabricEnv,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.nc = nc
        self.env = env
        self.timeout = timeout
        self.subject = _who(env)
        self._issuer: TokenIssuer | None = None

    # --- tokens --------------------------------------------------------------

    def _token_issuer(self) -> TokenIssuer:
        if self._issuer is None:
            path = self.env.token_key
            if path is None:
                raise CommandFailed(
                    f"no token key: set {ENV_TOKEN_KEY} to the PKI's signing.key"
                    f" (settings from {self.env.source})"
                )
            try:
                self._issuer = TokenIssuer.from_file(path, _ISSUER)
            except OSError as exc:
                raise CommandFailed(f"cannot read token key {path}: {exc.strerror}") from None
            except ValueError as exc:
                raise CommandFailed(f"bad token key: {exc}") from None
        return self._issuer

    def mint(
        self, scopes: Sequence[str], *, agent: str | None = None, node: str | None = None
    ) -> str:
        """A fresh token (new jti) for one request."""
        return self._token_issuer().mint(
            self.subject, list(scopes), agent=agent, node=node, ttl=TOKEN_TTL
        )

    # --- requests ------------------------------------------------------------

    async def request(self, subject: str, body: bytes, *, what: str, within: float | None) -> bytes:
        """One request; ``within`` seconds for the reply (default: the client's timeout)."""
        try:
            msg = await self.nc.request(subject, body, timeout=within or self.timeout)
        except nats.errors.NoRespondersError:
            raise FabricError(ErrorCode.UNAVAILABLE, f"no {what} answered") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise FabricError(
                ErrorCode.TIMEOUT, f"no answer from the {what} within {within or self.timeout:g}s"
            ) from None
        except nats.errors.Error as exc:
            raise CommandFailed(f"NATS error talking to the {what}: {exc}") from None
        return bytes(msg.data)

    async def api(self, method: str, request: Any, *, within: float | None = None) -> ApiResult:
        """Call ``fabric.api.<method>`` with a token bound to the request's target.

        A controller answering ``unavailable`` (JetStream electing a leader)
        changed nothing, and every API call is idempotent, so it is asked
        again, with a fresh token, for up to ``UNAVAILABLE_RETRY`` seconds.
        """
        agent, node = _target(request)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + UNAVAILABLE_RETRY
        delay = 0.2
        while True:
            token = self.mint([_API_SCOPES[method]], agent=agent, node=node)
            body = encode(msgspec.structs.replace(request, token=token))
            data = await self.request(subjects.api(method), body, what="controller", within=within)
            reply = _decode(data, ApiResult | ErrorReply, "controller")
            if not isinstance(reply, ErrorReply):
                return reply  # type: ignore[no-any-return]
            if reply.code is not ErrorCode.UNAVAILABLE or loop.time() + delay > give_up:
                raise FabricError(reply.code, reply.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def discover(
        self, request: DiscoverRequest, *, within: float | None = None
    ) -> DiscoverReply:
        body = encode(msgspec.structs.replace(request, token=self.mint(["read"])))
        data = await self.request(subjects.DISCOVER, body, what="controller", within=within)
        reply = _decode(data, DiscoverReply | ErrorReply, "controller")
        if isinstance(reply, ErrorReply):
            raise FabricError(reply.code, reply.message)
        return reply  # type: ignore[no-any-return]

    async def command(
        self, agent_id: str, command: AgentCommand, *, within: float | None = None
    ) -> CommandResult:
        """Send one agent command to whichever node hosts ``agent_id``."""
        token = self.mint([_OP_SCOPES[type(command)]], agent=agent_id)
        body = encode(msgspec.structs.replace(command, token=token))
        subject = subjects.agent_commands(agent_id)
        try:
            data = await self.request(subject, body, what="node", within=within)
        except FabricError as exc:
            if exc.code is ErrorCode.UNAVAILABLE:
                raise FabricError(
                    ErrorCode.NOT_FOUND, f"no agent {agent_id!r} on any node"
                ) from None
            raise
        try:
            reply = decode_reply(data)
        except ContractError as exc:
            raise CommandFailed(f"bad reply from the node: {exc}") from None
        if isinstance(reply, ErrorReply):
            raise FabricError(reply.code, reply.message)
        return reply


def _decode(data: bytes, type_: Any, who: str) -> Any:
    try:
        return decode(data, type_, max_bytes=64 * 1024 * 1024)
    except ContractError as exc:
        raise CommandFailed(f"bad reply from the {who}: {exc}") from None


@contextlib.asynccontextmanager
async def open_client(
    state_dir: Path | None = None,
    *,
    env: FabricEnv | None = None,
    request_timeout: float = DEFAULT_TIMEOUT,
    name: str = "fabric-cli",
) -> AsyncIterator[FabricClient]:
    """Find the fabric (or use ``env``), connect, yield a client, always close."""
    logging.getLogger("asyncio").addFilter(_not_eof_noise)  # idempotent: same function
    if env is None:
        try:
            env = find_fabric(state_dir)
        except NoFabricError as exc:
            raise CommandFailed(str(exc)) from None
    try:
        nc = await connect(
            env.url, ca=env.ca, cert=env.cert, key=env.key, name=name, error_cb=_quiet
        )
    except ConnectError as exc:
        text = str(exc).replace("(is the server running?)", "(is `fabric up` running?)")
        raise CommandFailed(text) from None
    try:
        yield FabricClient(nc, env, timeout=request_timeout)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# --- what CLI verbs share ------------------------------------------------------


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Options every verb that talks to a fabric takes."""
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="use DIR/fabric.env (default: FABRIC_* env, else .fabric/fabric.env)",
    )


def run_cli(
    args: argparse.Namespace,
    body: Callable[[FabricClient], Coroutine[Any, Any, int]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Open a client from the verb's options, run ``body`` with it, return its exit code."""
    state_dir = Path(args.state_dir) if getattr(args, "state_dir", None) else None

    async def main() -> int:
        async with open_client(state_dir, request_timeout=timeout) as client:
            return await body(client)

    return asyncio.run(main())


def check_name(name: str, what: str = "name") -> str:
    """A name from the command line, refused (exit 2) unless it is a valid id."""
    if not is_valid_id(name):
        raise UsageError(
            f"bad {what} {name!r}: use 1 to 63 lowercase letters, digits, '_' or '-',"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Target:
    """What a NAME on the command line stands for: a deployment's replicas, or one agent."""

    name: str
    agent_ids: list[str]
    record: DeploymentRecord | None

    @property
    def spec(self) -> AgentSpec | None:
        return None if self.record is None else self.record.deployment.spec


async def resolve(client: FabricClient, name: str) -> Target:
    """A deployment name gives its replicas; anything else is taken as an agent id."""
    check_name(name)
    try:
        result = await client.api("get", GetDeployment(name=name))
    except FabricError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
        return Target(name, [name], None)
    record = result.deployments[0]
    placed = [p.agent_id for p in record.replicas]
    wanted = replica_ids(name, record.deployment.replicas) if record.deployment.replicas else []
    return Target(name, placed or wanted, record)
