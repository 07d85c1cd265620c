"""kill -9 of the leader controller during a burst of tasks, long form (not a test).

    python bench/chaos/tasks_leader_kill.py                  # 5 runs of 10,000 tasks
    python bench/chaos/tasks_leader_kill.py --runs 10 --tasks 20000

Each run, in its own temporary directory (fresh PKI, removed at the end): one
TLS nats-server; three controllers as processes (``tests/workers/controller.py``:
the real Controller, lease TTL ``--lease-ttl``, ack wait 3 s), all dispatching
from the shared durable consumer; a real ``fabric-node`` running ``--workers``
worker agents (``tests/workers/ledger.py``, 32 tasks at once each) that append
each task's effect to a ledger. ``--tasks`` tasks (each holding its worker
100 ms, so every controller always has some out) are submitted at once; once
all are stored and a fifth have their effect, the lease holder is SIGKILLed. The run waits for the
successor's ``events.controller.leader`` and for every effect and result.

Prints one row per run and a summary: tasks submitted / acknowledged / with a
stored result, lost (acknowledged without a result or without its effect),
raw duplicates (effects beyond the first: tasks the dead leader had on a
worker, run again after redelivery; the ledger deduplicated by id holds every
task once), and the time from the kill to the new leader. Exits 1 if anything
was lost or a takeover took longer than the TTL plus one interval (+0.5 s).
The same scenario at CI size is ``tests/test_tasks_chaos.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The root first, even when PYTHONPATH holds it already: bench/node_agent.py
# must not shadow the node_agent package.
for entry in (str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)):
    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)

from _common import Marker, machine, pct, render_table  # noqa: E402
from natsfixtures import make_pki  # noqa: E402
from taskchaos import ChaosRig, LeaderKill, leader_kill, stored_events  # noqa: E402

from fabric.nats_server import NatsServer  # noqa: E402

CONTROLLERS = ("ctl-a", "ctl-b", "ctl-c")


async def one_run(tasks: int, workers: int, lease_ttl: float) -> tuple[LeaderKill, int]:
    """The run, and how many burst tasks have no ``task.completed`` event in EVENTS."""
    with tempfile.TemporaryDirectory(prefix="fabric-chaos-leader-") as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki")
        server = NatsServer.local(pki.dir, base / "nats")
        await server.start()
        rig = ChaosRig(pki, base, [server.url])
        try:
            run = await leader_kill(
                rig, burst=tasks, controllers=CONTROLLERS, lease_ttl=lease_ttl, workers=workers
            )
            events = await stored_events(await rig.admin(), "events.task.completed")
            return run, sum(1 for i in range(tasks) if not events[f"burst-{i}"])
        finally:
            await rig.aclose()
            await server.stop()


async def main(args: argparse.Namespace) -> int:
    marker = Marker()
    marker.install()
    runs: list[LeaderKill] = []
    no_event: list[int] = []
    try:
        for n in range(args.runs):
            run, missing_events = await one_run(args.tasks, args.workers, args.lease_ttl)
            runs.append(run)
            no_event.append(missing_events)
            print(
                f"run {n + 1}: {run.tasks} tasks in {run.seconds:.1f}s, killed {run.leader},"
                f" {run.successor} led after {run.takeover:.2f}s, lost {run.lost},"
                f" raw duplicates {run.raw_duplicates}",
                flush=True,
            )
    finally:
        left = marker.sweep()
        if left:
            print(f"killed leftovers: {left}")
    bound = args.lease_ttl + args.lease_ttl / 3
    rows = [
        [
            str(n + 1),
            f"{r.tasks} / {r.acked} / {r.results}",
            str(r.lost + (r.tasks - r.effects)),
            str(r.strays),
            str(r.raw_duplicates),
            f"{r.killed_sent} ({r.killed_resent})",
            f"{r.takeover:.2f}",
            f"{r.seconds:.1f}",
            f"{r.tasks / r.seconds:.0f}",
            str(no_event[n]),
        ]
        for n, r in enumerate(runs)
    ]
    print()
    print(
        render_table(
            [
                "run",
                "submitted / acked / results",
                "lost",
                "strays",
                "raw duplicates",
                "killed leader's assignments (re-sent)",
                "new leader s",
                "burst s",
                "tasks/s",
                "no succeeded event",
            ],
            rows,
        )
    )
    takeovers = [r.takeover for r in runs]
    lost = sum(r.lost + (r.tasks - r.effects) + r.strays for r in runs)
    summary = [
        [
            "kill -9 leader controller (3 controllers) during a task burst",
            str(len(runs)),
            f"{len(runs)} SIGKILL",
            f"{sum(r.tasks for r in runs)} / {sum(r.acked for r in runs)}"
            f" / {sum(r.results for r in runs)}",
            str(lost),
            str(sum(r.raw_duplicates for r in runs)),
            f"p50 {pct(takeovers, 50):.2f} s, max {max(takeovers):.2f} s"
            f" (TTL {args.lease_ttl:g} s + interval {args.lease_ttl / 3:.2f} s = {bound:.2f} s)",
        ]
    ]
    print()
    print(
        render_table(
            [
                "scenario",
                "runs",
                "faults injected",
                "tasks submitted / acked / results",
                "lost",
                "raw duplicates",
                "time to new leader",
            ],
            summary,
        )
    )
    print(f"\nmachine: {machine()}")
    ok = lost == 0 and max(takeovers) <= bound + 0.5
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
