"""A dispatcher as its own process (a controller's task half), for kill -9 tests.

``dispatcher.py NAME ACK_WAIT AGENT:TYPE[,TYPE] ...``: connects from the
``FABRIC_*`` env (a controller identity), dispatches to the listed agents
(a fixed view: the registry's part is not under test here) and prints
``ready`` once it fetches.
"""

from __future__ import annotations

import asyncio
import sys

from fabric.connect import connect
from fabric.tasks.dispatch import Candidate, Dispatcher, DispatchSettings
from fabric.tasks.stream import QueueSettings


async def main(name: str, ack_wait: float, agents: list[str]) -> None:
    view = {}
    for spec in agents:
        agent_id, types = spec.split(":", 1)
        view[agent_id] = Candidate(agent_id, "n1", frozenset(types.split(",")))
    nc = await connect(name=name)
    settings = DispatchSettings(
        queue=QueueSettings(ack_wait=ack_wait), retry_base=0.1, handback_delay=0.05, fetch_wait=0.5
    )
    dispatcher = Dispatcher(nc, name, lambda: view, settings)
    runner = asyncio.create_task(dispatcher.run())
    await dispatcher.ready.wait()
    print("ready", flush=True)
    await runner


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3:]))
