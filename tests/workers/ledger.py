"""A test worker: ``ledger.py LEDGER TYPE [TYPE...] [--concurrency N] [--grace S]``.

Every handler appends JSON lines to LEDGER (``start`` when it begins, ``done``
when it returns), so a test counts how often each task really ran. The
payload steers it: ``{"sleep": s}`` runs that long, reporting progress
every ``progress`` seconds (default 0.2); ``{"fail": "text"}`` raises;
``{"big": n}`` returns n bytes; ``{"gate": path}`` holds the task until that file
exists. Prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from fabric.worker import TaskContext, Worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ledger", type=Path)
    parser.add_argument("types", nargs="+")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    worker = Worker(grace=args.grace)

    def note(event: str, ctx: TaskContext) -> None:
        line = {"event": event, "task": ctx.task_id, "attempt": ctx.attempt, "agent": ctx.agent_id}
        # One write of one short line with O_APPEND: lines never interleave.
        fd = os.open(args.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    async def handle(ctx: TaskContext, payload: Any) -> Any:
        note("start", ctx)
        payload = payload if isinstance(payload, dict) else {"value": payload}
        await ctx.progress(0.0, "started")
        if "gate" in payload:
            # Held until the test makes this file (the SDK keeps the task alive).
            gate = str(payload["gate"])
            while not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240
                await asyncio.sleep(0.02)
        total = float(payload.get("sleep", 0))
        step = float(payload.get("progress", 0.2))
        loop = asyncio.get_running_loop()
        until = loop.time() + total
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(step, left))
            await ctx.progress(1 - max(0.0, until - loop.time()) / total, "working")
        if "fail" in payload:
            raise RuntimeError(str(payload["fail"]))
        note("done", ctx)
        if "big" in payload:
            return "x" * int(payload["big"])
        return {"echo": payload, "agent": ctx.agent_id}

    for task_type in args.types:
        worker.task(task_type, concurrency=args.concurrency)(handle)

    async def run() -> None:
        runner = asyncio.create_task(worker.run())
        ready = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            print("ready", flush=True)
        else:
            ready.cancel()
        await runner

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
