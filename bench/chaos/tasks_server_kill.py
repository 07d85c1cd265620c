"""kill -9 of one of three NATS servers under task load, long form (not a test).

    python bench/chaos/tasks_server_kill.py                   # 3 runs
    python bench/chaos/tasks_server_kill.py --runs 10 --after 2000 --rate 300

Each run, in its own temporary directory (fresh PKI, removed at the end): a
3-server cluster over TLS routes (R3 streams and buckets, HTTPS monitoring
to see where each client is connected); two controllers as processes
(``tests/workers/controller.py``); a real ``fabric-node`` with three worker
agents (``tests/workers/ledger.py``) appending each task's effect to a
ledger; a submitter at ``--rate`` tasks/s that starts on the TASKS stream's
leader. Three phases under that load:

1. kill -9 the TASKS stream leader; wait until every client (controllers,
   node agent, workers, submitter) is connected to a server left and
   ``--after`` tasks submitted after the kill have their effect;
2. start it again; wait until it is a current replica (no lag) of TASKS and
   of the task records bucket;
3. kill -9 another server (the one more clients sit on), as in 1, then start
   it again.

After each phase the load stops and every task that got a PubAck must have
its effect in the ledger and a stored ``succeeded`` record. Prints one row
per phase and a summary; exits 1 if anything acknowledged was lost. The same
scenario at CI size is ``tests/test_tasks_chaos.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

from _common import Marker, machine, render_table  # noqa: E402
from natsfixtures import make_pki  # noqa: E402
from taskchaos import ChaosRig, ClusterLoad, ServerLoss, stored_events  # noqa: E402

from fabric.nats_server import NatsCluster, free_port  # noqa: E402
from fabric.tasks.stream import RECORDS_BUCKET, TASKS_STREAM  # noqa: E402


async def one_run(rate: float, after: int) -> tuple[list[ServerLoss], int, int, int]:
    """The three phases; also the submitter's reconnects, stray effects, and
    acknowledged tasks with no ``task.completed`` event stored in EVENTS."""
    with tempfile.TemporaryDirectory(prefix="fabric-chaos-server-") as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki")
        cluster = NatsCluster(pki.dir, base / "cluster", probe=pki["ctl-1"])
        for server in cluster.servers:
            server.settings = dataclasses.replace(server.settings, monitor_port=free_port())
        await cluster.start()
        rig = ChaosRig(pki, base, cluster.urls)
        phases: list[ServerLoss] = []
        try:
            load = ClusterLoad(rig, cluster, rate=rate)
            await load.start()
            victim = await load.stream_leader(TASKS_STREAM)
            await load.connect_submitter(victim)
            phases.append(await load.lose(victim, "a", after=after))
            streams = (TASKS_STREAM, f"KV_{RECORDS_BUCKET}")
            phases.append(await load.rejoin(victim, "b", streams))
            second = load.busiest(s for s in cluster.servers if s is not victim)
            try:
                phases.append(await load.lose(second, "c", "kill after the return", after=after))
            finally:
                if not second.running:
                    await second.start()
            events = await stored_events(await rig.admin(), "events.task.completed")
            assert load.submitter is not None
            no_event = sum(1 for i in load.submitter.acked if not events[i])
            return phases, load.reconnects, len(load.strays()), no_event
        finally:
            await rig.aclose()
            await cluster.stop()


async def main(args: argparse.Namespace) -> int:
    marker = Marker()
    marker.install()
    rows: list[list[str]] = []
    all_phases: list[ServerLoss] = []
    strays = 0
    no_event = 0
    try:
        for n in range(args.runs):
            phases, reconnects, stray, missing_events = await one_run(args.rate, args.after)
            strays += stray
            no_event += missing_events
            all_phases += phases
            for p in phases:
                rows.append(
                    [
                        str(n + 1),
                        p.phase,
                        p.server,
                        str(len(p.clients_on_it)),
                        f"{p.back_after:.2f}",
                        f"{p.acked + p.not_acked} / {p.acked} / {p.results}",
                        str(len(p.lost) + len(p.missing)),
                        str(p.raw_duplicates),
                    ]
                )
            print(
                f"run {n + 1}: "
                + "; ".join(
                    f"{p.phase} {p.server}: {p.acked} acked, lost {len(p.lost) + len(p.missing)}"
                    for p in phases
                )
                + f"; submitter reconnects {reconnects}",
                flush=True,
            )
    finally:
        left = marker.sweep()
        if left:
            print(f"killed leftovers: {left}")
    print()
    print(
        render_table(
            [
                "run",
                "phase",
                "server",
                "clients on it",
                "all back s (return: caught up s)",
                "submitted / acked / results",
                "lost",
                "raw duplicates",
            ],
            rows,
        )
    )
    kills = [p for p in all_phases if p.phase != "return"]
    returns = [p for p in all_phases if p.phase == "return"]
    lost = sum(len(p.lost) + len(p.missing) for p in all_phases) + strays

    def tally(phases: list[ServerLoss]) -> str:
        submitted = sum(p.acked + p.not_acked for p in phases)
        return f"{submitted} / {sum(p.acked for p in phases)} / {sum(p.results for p in phases)}"

    summary = [
        [
            "kill -9 one of 3 NATS servers under task load",
            str(args.runs),
            f"{len(kills)} SIGKILL ({sum(len(p.clients_on_it) for p in kills)} clients cut)",
            tally(kills),
            str(sum(len(p.lost) + len(p.missing) for p in kills)),
            str(sum(p.raw_duplicates for p in kills)),
            f"all clients back: max {max(p.back_after for p in kills):.2f} s",
        ],
        [
            "... the killed server brought back under load",
            str(args.runs),
            f"{len(returns)} restarts",
            tally(returns),
            str(sum(len(p.lost) + len(p.missing) for p in returns)),
            str(sum(p.raw_duplicates for p in returns)),
            f"replicas current: max {max(p.back_after for p in returns):.2f} s",
        ],
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
                "recovery",
            ],
            summary,
        )
    )
    print(f"\nstray effects (tasks never submitted): {strays}")
    print(f"acknowledged tasks with no task.completed event in EVENTS: {no_event}")
    print(f"machine: {machine()}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="tasks submitted per second")
    parser.add_argument(
        "--after", type=int, default=1000, help="tasks that must take effect after each kill"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
