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

import resource
from collections.abc import Callable

from schemas.agent import LimitMechanism, Limits

__all__ = [
    "CPU_PERIOD_US",
    "Plan",
    "cgroup_settings",
    "memory_exceeded",
    "plan_limits",
    "rlimit_preexec",
    "rlimits_for",
]

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
    if limits.open_files is None:
        return []
    return [(resource.RLIMIT_NOFILE, limits.open_files, limits.open_files)]


def rlimit_preexec(rlimits: list[RLimit]) -> Callable[[], None] | None:
    """A ``preexec_fn`` setting the rlimits in the child, or None when there are none.

    Applied in the child rather than with ``prlimit(pid)`` after spawn: the
    child has already exec'd by the time ``Popen`` returns, so a program
    that reads or uses its limits at once would race the parent.
    ``preexec_fn`` costs about 1 ms (fork instead of vfork), so it is used
    only when the spec asks for a limit.
    """
    if not rlimits:
        return None

    def apply() -> None:
        for res, soft, hard in rlimits:
            resource.setrlimit(res, (soft, hard))

    return apply


def memory_exceeded(limits: Limits, plan: Plan, rss_bytes: int) -> bool:
    """Watchdog verdict: only when memory is not already enforced by the kernel."""
    return (
        plan.get("memory") is LimitMechanism.WATCHDOG
        and limits.memory_bytes is not None
        and rss_bytes > limits.memory_bytes
    )
