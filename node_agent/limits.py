"""Which mechanism enforces each of an agent's limits, and how it is applied.

| limit        | cgroup v2 (controller enabled)  | otherwise                               |
|--------------|---------------------------------|-----------------------------------------|
| memory_bytes | ``memory.max`` (kernel OOM)     | watchdog: tree RSS checked every metrics |
|              |                                 | tick, restart above the ceiling          |
| cpus         | ``cpu.max`` quota per 100 ms    | none                                     |
| pids         | ``pids.max``                    | none: ``RLIMIT_NPROC`` counts every      |
|              |                                 | process of the *user*, not of the agent  |
| open_files   | rlimit (cgroups have no fd cap) | ``RLIMIT_NOFILE`` set in the child       |

``RLIMIT_AS`` is deliberately not used for memory: it caps virtual address
space, which runtimes reserve generously (a JVM or Go program fails at
start long before its RSS is anywhere near the ceiling).

The resulting mapping (limit name -> LimitMechanism) is what
``AgentStatus.limits`` reports.
"""

from __future__ import annotations

import logging
import resource

from node_agent.cgroup import AgentCgroup
from schemas.agent import LimitMechanism, Limits

__all__ = [
    "CPU_PERIOD_US",
    "Plan",
    "apply_limits",
    "cgroup_settings",
    "memory_exceeded",
    "plan_limits",
    "rlimits_for",
]

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
Plan = dict[str, LimitMechanism]
RLimit = tuple[int, int, int]  # (resource, soft, hard)


def plan_limits(limits: Limits, controllers: frozenset[str]) -> Plan:
    """Mechanism for every limit the spec sets; ``controllers`` are those enabled for it."""
    plan: Plan = {}
    if limits.memory_bytes is not None:
        plan["memory"] = (
            LimitMechanism.CGROUP if "memory" in controllers else LimitMechanism.WATCHDOG
        )
    if limits.cpus is not None:
        plan["cpus"] = LimitMechanism.CGROUP if "cpu" in controllers else LimitMechanism.NONE
    if limits.pids is not None:
        plan["pids"] = LimitMechanism.CGROUP if "pids" in controllers else LimitMechanism.NONE
    if limits.open_files is not None:
        plan["open_files"] = LimitMechanism.RLIMIT
    return plan


def cgroup_settings(limits: Limits, plan: Plan) -> dict[str, str]:
    """cgroup interface files to write for the limits the plan gives to cgroups."""
    out: dict[str, str] = {}
    if plan.get("memory") is LimitMechanism.CGROUP and limits.memory_bytes is not None:
        out["memory.max"] = str(limits.memory_bytes)
    if plan.get("cpus") is LimitMechanism.CGROUP and limits.cpus is not None:
        out["cpu.max"] = f"{max(1000, int(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"
    if plan.get("pids") is LimitMechanism.CGROUP and limits.pids is not None:
        out["pids.max"] = str(limits.pids)
    return out


def rlimits_for(limits: Limits) -> list[RLimit]:
    """rlimits to set in the child before exec (see spawn: why not prlimit after)."""
    if limits.open_files is None:
        return []
    return [(resource.RLIMIT_NOFILE, limits.open_files, limits.open_files)]


def memory_exceeded(limits: Limits, plan: Plan, rss_bytes: int) -> bool:
    """Watchdog verdict: only when memory is not already enforced by the kernel."""
    return (
        plan.get("memory") is LimitMechanism.WATCHDOG
        and limits.memory_bytes is not None
        and rss_bytes > limits.memory_bytes
    )


def apply_limits(limits: Limits, cgroup: AgentCgroup | None) -> Plan:
    """Plan the limits for an agent's cgroup (or none) and write the cgroup's part."""
    plan = plan_limits(limits, cgroup.controllers() if cgroup is not None else frozenset())
    if cgroup is not None:
        for name, value in cgroup_settings(limits, plan).items():
            try:
                cgroup.set(name, value)
            except OSError as exc:
                # The controller was listed but refuses the value: say so, run anyway.
                log.warning("cannot set %s=%s in %s: %s", name, value, cgroup.path, exc)
    return plan
