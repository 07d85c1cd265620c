"""The node agent's settings, from flags and ``FABRIC_*`` environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fabric.spec_policy import NodeSpecPolicy
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
    allow_root_agents: bool = False
    """Run specs whose user is uid 0 or group gid 0 (refused by default: spec_root_forbidden)."""
    agent_cwd_root: Path | None = None
    """When set, an agent's cwd must be this directory or below it (spec_cwd_forbidden)."""

    def __post_init__(self) -> None:
        validate_id(self.node_id, "node id")
        for capability in self.capabilities:
            validate_id(capability, "capability")
        if self.heartbeat_interval <= 0 or self.metrics_interval <= 0:
            raise ValueError("intervals must be positive")
        if self.agent_cwd_root is not None and not self.agent_cwd_root.is_absolute():
            raise ValueError(f"agent cwd root must be an absolute path, not {self.agent_cwd_root}")

    @property
    def spec_policy(self) -> NodeSpecPolicy:
        """What this node lets a spec ask for (fabric.spec_policy)."""
        return NodeSpecPolicy(
            allow_root_agents=self.allow_root_agents, cwd_root=self.agent_cwd_root
        )

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
