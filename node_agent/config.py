"""The node agent's settings, from flags and ``FABRIC_*`` environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from schemas.errors import ContractError
from schemas.ids import validate_id

__all__ = ["NodeAgentConfig", "default_node_id"]


@dataclass(frozen=True)
class NodeAgentConfig:
    node_id: str
    state_dir: Path
    token_keys: tuple[Path, ...]
    """Public keys whose tokens this node accepts (the operator's, the controllers')."""
    nats_urls: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0
    metrics_interval: float = 5.0
    register_timeout: float = 2.0
    on_sigterm: Literal["drain", "detach"] = "drain"
    max_command_bytes: int = 256 * 1024
    """Larger commands are refused with ``payload_too_large`` before decoding."""
    worker_cert: Path | None = None
    worker_key: Path | None = None
    """Certificate handed to agents (``FABRIC_CERT``/``FABRIC_KEY``) for the worker SDK."""

    def __post_init__(self) -> None:
        validate_id(self.node_id, "node id")
        for capability in self.capabilities:
            validate_id(capability, "capability")
        if self.heartbeat_interval <= 0 or self.metrics_interval <= 0:
            raise ValueError("intervals must be positive")

    def agent_env(self, agent_id: str) -> dict[str, str]:
        """What an agent's process learns about the fabric from its environment."""
        env = {"FABRIC_AGENT_ID": agent_id, "FABRIC_NODE_ID": self.node_id}
        if self.nats_urls:
            env["FABRIC_NATS_URL"] = self.nats_urls
        if self.ca:
            env["FABRIC_CA"] = str(self.ca)
        if self.worker_cert and self.worker_key:
            env["FABRIC_CERT"] = str(self.worker_cert)
            env["FABRIC_KEY"] = str(self.worker_key)
        return env


def default_node_id() -> str:
    """The short host name, lowercased; refused when it is not a valid id."""
    name = socket.gethostname().split(".", 1)[0].lower()
    try:
        return validate_id(name, "node id (from the host name)")
    except ContractError as exc:
        raise ValueError(f"{exc.message}; pass --node-id") from None


def env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
