"""Which mechanism enforces each of an agent's limits, and how it is applied.

| limit        | cgroup v2 (controller enabled)  | otherwise                               |
|--------------|---------------------------------|-----------------------------------------|
| memory_bytes | ``memory.max`` (kernel OOM)     | watchdog: tree RSS checked every metrics |
|              |                                 | tick, restart above the ceiling          |
| cpus         | ``cpu.max`` quota per 100 ms    | none                                     |
| pids         | ``pids.max``                    | ``RLIMIT_NPROC`` when the agent runs as  |
|              |                                 | a non-root ``user`` (it counts every     |
|              |                                 | process of that user, so give the agent  |
|              |                                 | a user of its own); else none (root is   |
|              |                                 | exempt from ``RLIMIT_NPROC``)            |
| open_files   | rlimit (cgroups have no fd cap) | ``RLIMIT_NOFILE`` set in the child       |

``RLIMIT_AS`` is deliberately not used for memory: it caps virtual address
space, which runtimes reserve generously (a JVM or Go program fails at
start long before its RSS is anywhere near the ceiling).

The resulting mapping (limit name -> LimitMechanism) is what
``AgentStatus.limits`` reports.
"""

from __future__ import annotations

import logging
import pwd
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
    "runs_unprivileged",
]

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
Plan = dict[str, LimitMechanism]
RLimit = tuple[int, int, int]  # (resource, soft, hard)


def plan_limits(limits: Limits, controllers: frozenset[str], *, unprivileged: bool = False) -> Plan:
    """Mechanism for every limit the spec sets; ``controllers`` are those enabled for it.

    ``unprivileged``: the agent runs as a non-root user, so ``RLIMIT_NPROC``
    binds it (the kernel exempts root).
    """
    plan: Plan = {}
    if limits.memory_bytes is not None:
        plan["memory"] = (
            LimitMechanism.CGROUP if "memory" in controllers else LimitMechanism.WATCHDOG
        )
    if limits.cpus is not None:
        plan["cpus"] = LimitMechanism.CGROUP if "cpu" in controllers else LimitMechanism.NONE
    if limits.pids is not None:
        if "pids" in controllers:
            plan["pids"] = LimitMechanism.CGROUP
        else:
            plan["pids"] = LimitMechanism.RLIMIT if unprivileged else LimitMechanism.NONE
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


def rlimits_for(limits: Limits, plan: Plan | None = None) -> list[RLimit]:
    """rlimits to set in the child before exec (see spawn: why not prlimit after)."""
    out: list[RLimit] = []
    if limits.open_files is not None:
        out.append((resource.RLIMIT_NOFILE, limits.open_files, limits.open_files))
    if plan and plan.get("pids") is LimitMechanism.RLIMIT and limits.pids is not None:
        out.append((resource.RLIMIT_NPROC, limits.pids, limits.pids))
    return out


def memory_exceeded(limits: Limits, plan: Plan, rss_bytes: int) -> bool:
    """Watchdog verdict: only when memory is not already enforced by the kernel."""
    return (
        plan.get("memory") is LimitMechanism.WATCHDOG
        and limits.memory_bytes is not None
        and rss_bytes > limits.memory_bytes
    )


def runs_unprivileged(user: str | None) -> bool:
    """Whether the agent runs as a user of its own that is not root.

    An agent without ``user`` shares the node agent's user: ``RLIMIT_NPROC``
    would then count the node agent and every other agent too, so it is not
    used.
    """
    if user is None:
        return False
    try:
        return pwd.getpwnam(user).pw_uid != 0
    except KeyError:
        return False  # the spawn fails and says why


def apply_limits(limits: Limits, cgroup: AgentCgroup | None, user: str | None = None) -> Plan:
    """Plan the limits for an agent's cgroup (or none) and write the cgroup's part."""
    controllers = cgroup.controllers() if cgroup is not None else frozenset()
    unprivileged = limits.pids is not None and runs_unprivileged(user)
    plan = plan_limits(limits, controllers, unprivileged=unprivileged)
    if cgroup is not None:
        for name, value in cgroup_settings(limits, plan).items():
            try:
                cgroup.set(name, value)
            except OSError as exc:
                # The controller was listed but refuses the value: say so, run anyway.
                log.warning("cannot set %s=%s in %s: %s", name, value, cgroup.path, exc)
    return plan
