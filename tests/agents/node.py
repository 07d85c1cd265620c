"""A node agent in its own process, to be killed with SIGKILL by a test.

argv: <state_dir> <fifo> <n agents>. Places n agents that sleep, writes
their pids (space separated) into the FIFO, then runs until killed.
"""

import asyncio
import sys
from pathlib import Path

from node_agent.supervisor import Supervisor, SupervisorConfig
from schemas.agent import AgentSpec


def report(fifo: str, pids: list[str]) -> None:
    with open(fifo, "w") as f:  # the test holds the FIFO open: this does not block
        f.write(" ".join(pids) + "\n")


async def main() -> None:
    state_dir, fifo, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    async with Supervisor(SupervisorConfig(node_id="n1", state_dir=state_dir)) as sup:
        pids = []
        for i in range(count):
            spec = AgentSpec(name=f"a{i}", argv=["sleep", "1000"], start_seconds=0)
            status = await sup.place(spec)
            pids.append(str(status.pid))
        report(fifo, pids)
        await asyncio.Event().wait()


asyncio.run(main())
