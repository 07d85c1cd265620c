"""Which agent runs a task: the pure chooser, and a controller's view of agents.

:func:`choose_agent` decides over a snapshot (no NATS, no clock), so it is
tested table-driven; :func:`controller_agents` builds that snapshot from a
controller's live registry view: running agents whose deployment's spec
declares ``capabilities``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.agent import AgentState, HealthVerdict

__all__ = ["AgentView", "Candidate", "choose_agent", "controller_agents", "retry_delay"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running agent, where it runs and which task types its spec declares."""

    agent_id: str
    node_id: str | None
    capabilities: frozenset[str]
    healthy: bool = True


AgentView = Callable[[], Mapping[str, Candidate]]
"""Returns the running agents by id, as the registry sees them now."""


def choose_agent(
    task_type: str,
    candidates: Mapping[str, Candidate],
    inflight: Mapping[str, int],
    *,
    limit: int | None = None,
) -> str | None:
    """The agent to run a ``task_type`` task: healthy, serving that type, below
    ``limit`` tasks in flight; fewest in flight first, ties by id. None if none."""
    best: tuple[int, str] | None = None
    for agent_id, candidate in candidates.items():
        if task_type not in candidate.capabilities or not candidate.healthy:
            continue
        load = inflight.get(agent_id, 0)
        if limit is not None and load >= limit:
            continue
        if best is None or (load, agent_id) < best:
            best = (load, agent_id)
    return None if best is None else best[1]


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retrying after failed attempt number ``attempt`` (1-based)."""
    return min(cap, base * 2.0 ** max(0, attempt - 1))


# --- the controller's view ---------------------------------------------------


def controller_agents(controller: Any) -> dict[str, Candidate]:
    """Running agents that declare capabilities, from a controller's live view.

    An agent counts when its deployment places it on a node whose heartbeat
    is fresh and its latest status (else that heartbeat) says ``running``.
    """
    deployments = getattr(controller, "deployments", None)
    if deployments is None:
        return {}
    now = asyncio.get_running_loop().time()
    timeout = controller.config.node_timeout
    out: dict[str, Candidate] = {}
    for record, _ in list(deployments.items.values()):
        capabilities = frozenset(record.deployment.spec.capabilities)
        if not capabilities or record.deleting:
            continue
        for placed in record.replicas:
            node_id = placed.node_id
            if node_id is None or placed.failed:
                continue
            live = controller.live.get(node_id)
            if live is None or now - live.last_seen > timeout:
                continue
            status = controller.statuses.get(placed.agent_id, {}).get(node_id)
            if status is not None:
                state, healthy = status.state, status.health is not HealthVerdict.UNHEALTHY
            else:
                summary = live.agents.get(placed.agent_id)
                if summary is None:
                    continue
                state, healthy = summary.state, True
            if state is AgentState.RUNNING:
                out[placed.agent_id] = Candidate(placed.agent_id, node_id, capabilities, healthy)
    return out
