"""What an agent is: its spec (desired), its state machine, its observed status.

States (the node agent validates every transition; see node_agent.lifecycle)::

    pending ──▶ starting ──▶ running ◀──▶ paused
                  │  ▲          │            │
                  │  │          ▼            ▼
                  │  └─────── backoff ◀── (crash) ──▶ failed
                  ▼                                   (budget spent / cannot spawn)
               stopping ──▶ stopped | exited (code or signal)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec

from schemas.common import Labels, Seconds, ShortText, Text, Timestamp
from schemas.ids import AgentId, NodeId, TaskType

__all__ = [
    "AgentMetrics",
    "AgentSpec",
    "AgentState",
    "AgentStatus",
    "Backoff",
    "ExecCheck",
    "HealthCheck",
    "HealthSpec",
    "HealthVerdict",
    "HttpCheck",
    "LimitMechanism",
    "Limits",
    "LogSpec",
    "ProcessCheck",
    "RestartPolicy",
    "RestartPolicyKind",
    "SignalName",
    "TcpCheck",
    "Transition",
]

SignalName = Literal[
    "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGCONT", "SIGWINCH"
]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]
EnvKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}(?!\n)$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=32768)]
PosixName = Annotated[str, msgspec.Meta(pattern=r"^[a-z_][a-z0-9_-]{0,31}(?!\n)$")]
Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class RestartPolicyKind(StrEnum):
    NEVER = "never"
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    UNLESS_STOPPED = "unless-stopped"


class Backoff(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Delay before restart number n (0-based): min(max, initial * multiplier**n) ± jitter."""

    initial: Seconds = 0.5
    max: Seconds = 30.0
    multiplier: Annotated[float, msgspec.Meta(ge=1.0, le=10.0)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0, description="Fraction of the delay.")] = (
        0.1
    )


class RestartPolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """When to restart, how fast, and how often before giving up.

    ``max_restarts`` restarts within ``window`` seconds are allowed; one more
    makes the agent ``failed`` (an escalation). ``-1`` retries forever.
    """

    policy: RestartPolicyKind = RestartPolicyKind.ON_FAILURE
    backoff: Backoff = Backoff()
    max_restarts: Annotated[int, msgspec.Meta(ge=-1, le=1_000_000)] = 10
    window: Seconds = 60.0


class ProcessCheck(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="process"):
    """Healthy while the main process exists and is not a zombie."""


class TcpCheck(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="tcp"):
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    host: Annotated[str, msgspec.Meta(max_length=253)] = "127.0.0.1"


class HttpCheck(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="http"):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2048)]
    expect_status_min: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    expect_status_max: Annotated[int, msgspec.Meta(ge=100, le=599)] = 399


class ExecCheck(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="exec"):
    argv: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=64)]


HealthCheck = ProcessCheck | TcpCheck | HttpCheck | ExecCheck


class HealthSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    check: HealthCheck
    interval: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 2.0
    initial_delay: Seconds = 0.0
    failure_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    success_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    restart_on_unhealthy: bool = False


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Resource ceilings for the agent's whole process tree; None means unlimited."""

    memory_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=1, le=4_194_304)] | None = None
    open_files: Annotated[int, msgspec.Meta(ge=16, le=1 << 20)] | None = None


class LogSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """stdout/stderr go to size-rotated files under the node's state dir."""

    max_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 34)] = 10 * 1024 * 1024
    backups: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    publish: bool = False


class AgentSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The desired shape of one agent: how to run it and how to keep it running.

    ``argv`` is executed directly; with ``shell=True`` it must hold one string,
    run by ``/bin/sh -c``. ``env`` is merged over the node agent's environment
    unless ``clean_env`` is true.
    """

    name: AgentId
    argv: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=1024)]
    shell: bool = False
    env: Annotated[dict[EnvKey, EnvValue], msgspec.Meta(max_length=512)] = {}
    clean_env: bool = False
    cwd: Path | None = None
    user: PosixName | None = None
    group: PosixName | None = None
    start_seconds: Seconds = 1.0
    stop_signal: SignalName = "SIGTERM"
    stop_timeout: Seconds = 10.0
    restart: RestartPolicy = RestartPolicy()
    health: HealthSpec | None = None
    limits: Limits = Limits()
    logs: LogSpec = LogSpec()
    capabilities: Annotated[list[TaskType], msgspec.Meta(max_length=64)] = []
    labels: Labels = {}
    on_partition: Literal["keep", "stop"] = "keep"

    def __post_init__(self) -> None:
        if self.shell and len(self.argv) != 1:
            raise ValueError("with shell=true, argv must hold exactly one command string")


class AgentState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"
    BACKOFF = "backoff"


class HealthVerdict(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


class LimitMechanism(StrEnum):
    CGROUP = "cgroup"
    RLIMIT = "rlimit"
    WATCHDOG = "watchdog"
    NONE = "none"


class Transition(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    from_state: AgentState | None
    to_state: AgentState
    at: Timestamp
    reason: ShortText


class AgentMetrics(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One sample of the agent's whole process tree."""

    cpu_percent: Annotated[float, msgspec.Meta(ge=0)]
    rss_bytes: Annotated[int, msgspec.Meta(ge=0)]
    threads: Annotated[int, msgspec.Meta(ge=0)]
    open_fds: Annotated[int, msgspec.Meta(ge=0)]
    io_read_bytes: Annotated[int, msgspec.Meta(ge=0)]
    io_write_bytes: Annotated[int, msgspec.Meta(ge=0)]
    children: Annotated[int, msgspec.Meta(ge=0)]
    zombies: Annotated[int, msgspec.Meta(ge=0)]


class AgentStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Published on ``agents.<agent_id>.status`` on every transition and metrics tick."""

    agent_id: AgentId
    node_id: NodeId
    state: AgentState
    since: Timestamp
    reason: ShortText = ""
    pid: Annotated[int, msgspec.Meta(ge=1)] | None = None
    restarts: Annotated[int, msgspec.Meta(ge=0)] = 0
    exit_code: int | None = None
    exit_signal: ShortText | None = None
    health: HealthVerdict = HealthVerdict.UNKNOWN
    metrics: AgentMetrics | None = None
    limits: Annotated[dict[ShortText, LimitMechanism], msgspec.Meta(max_length=8)] = {}
    epoch: Annotated[int, msgspec.Meta(ge=0)] = 0
    history: Annotated[list[Transition], msgspec.Meta(max_length=64)] = []
    message: Text = ""
