"""Quick figures for the supervision core alone (no NATS, no comparison).

Run from the repository root: ``python bench/core_quick.py [auto|none]``
(``none`` disables cgroups). Not a test and not the issue's benchmark
(``bench/node_agent.py`` compares with supervisord over NATS); it prints
spawn -> RUNNING, kill -9 -> new pid RUNNING, 100 agents to RUNNING, 100
TERM-ignoring stops with a 2 s grace, the metrics tick over 1,000 idle
agents and the supervisor's own CPU and RSS while they idle.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ZERO_BACKOFF, pct

from node_agent.supervisor import Supervisor, SupervisorConfig
from schemas.agent import (
    AgentSpec,
    AgentState,
    AgentStatus,
)

IGNORE_TERM = ["sh", "-c", "trap '' TERM; exec sleep 1000"]


class Watch:
    """Resolves a future when a status for an agent matches a condition."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Future[float], Callable[[AgentStatus], bool]]] = {}

    def on_status(self, s: AgentStatus) -> None:
        entry = self._waiting.get(s.agent_id)
        if entry and not entry[0].done() and entry[1](s):
            entry[0].set_result(time.perf_counter())

    def expect(self, agent_id: str, cond: Callable[[AgentStatus], bool]) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[agent_id] = (fut, cond)
        return fut


async def main(cgroup: Literal["auto"] | None) -> None:
    watch = Watch()
    cfg = SupervisorConfig(node_id="bench", state_dir=Path(tempfile.mkdtemp()), cgroup_base=cgroup)
    async with Supervisor(cfg, on_status=watch.on_status) as sup:
        print(f"cgroups: {sup.cgroups.base if sup.cgroups else 'off'}")
        lat = []
        for i in range(200):
            up = watch.expect(f"s{i}", lambda s: s.state is AgentState.RUNNING)
            t0 = time.perf_counter()
            await sup.place(
                AgentSpec(
                    name=f"s{i}", argv=["sleep", "1000"], start_seconds=0, restart=ZERO_BACKOFF
                )
            )
            lat.append(await up - t0)
        print(
            f"spawn -> RUNNING (200): p50 {pct(lat, 50) * 1e3:.2f} ms, "
            f"p99 {pct(lat, 99) * 1e3:.2f} ms"
        )
        lat = []
        for i in range(50):
            old = sup.status(f"s{i}").pid
            assert old is not None
            up = watch.expect(
                f"s{i}",
                lambda s, old=old: s.state is AgentState.RUNNING and s.pid not in (None, old),
            )
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            lat.append(await up - t0)
        print(
            f"kill -9 -> new pid RUNNING (50): p50 {pct(lat, 50) * 1e3:.2f} ms, "
            f"p99 {pct(lat, 99) * 1e3:.2f} ms"
        )
        for i in range(200):
            await sup.remove(f"s{i}")

        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                sup.place(AgentSpec(name=f"h{i}", argv=["sleep", "1000"], start_seconds=0))
                for i in range(100)
            )
        )
        print(f"100 agents -> all RUNNING: {(time.perf_counter() - t0) * 1e3:.0f} ms")
        await sup.stop_many([f"h{i}" for i in range(100)])

        ups = [watch.expect(f"t{i}", lambda s: s.state is AgentState.RUNNING) for i in range(100)]
        for i in range(100):
            await sup.place(
                AgentSpec(name=f"t{i}", argv=IGNORE_TERM, start_seconds=0.2, stop_timeout=2.0)
            )
        await asyncio.gather(*ups)
        t0 = time.perf_counter()
        await sup.stop_many([f"t{i}" for i in range(100)])
        print(f"stop 100 TERM-ignoring agents, 2 s grace: {time.perf_counter() - t0:.2f} s")

        for i in range(1000):
            await sup.place(AgentSpec(name=f"k{i}", argv=["sleep", "1000"], start_seconds=0))
        costs = []
        for _ in range(5):
            c0 = time.process_time()
            await sup.tick()
            costs.append(time.process_time() - c0)
        tick = statistics.median(costs)
        print(
            f"metrics tick, 1,000 agents: {tick * 1e3:.0f} ms CPU "
            f"({tick / cfg.metrics_interval * 100:.2f} % of a core at {cfg.metrics_interval:g} s)"
        )
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(30)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(
            f"idle 30 s with 1,000 agents: {cpu / 30 * 100:.2f} % of a core, "
            f"max RSS {r1.ru_maxrss / 1024:.0f} MiB"
        )
        t0 = time.perf_counter()
    print(f"drain 1,000 agents: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    asyncio.run(main(None if sys.argv[1:] == ["none"] else "auto"))
