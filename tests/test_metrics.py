"""Process-tree metrics: a busy child shows non-zero figures; the /proc table; node metrics."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
from agents.harness import running, script, spec, until

from node_agent import metrics as metrics_module
from node_agent.metrics import ProcTable, TreeSampler, node_metrics


def test_all_exports_exist() -> None:
    for name in metrics_module.__all__:
        assert hasattr(metrics_module, name)


def test_proc_table_finds_descendants() -> None:
    table = ProcTable.scan()
    me = os.getpid()
    assert table.exists(me)
    assert table.parents[me] == os.getppid()
    assert me in table.descendants(os.getppid())
    assert table.descendants(-5) == []


def test_sampler_caches_and_forgets(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "100"])
    try:
        sampler = TreeSampler()
        first = sampler.sample([child.pid, 999_999_999])  # a missing pid is skipped
        assert [pid for pid, _ in first.members] == [child.pid]
        assert first.metrics.threads == 1  # (RSS may still be 0 this soon after exec)
        assert first.members[0][1] == psutil.Process(child.pid).create_time()
        sampler.end_tick()
        sampler.end_tick()  # not sampled in this tick: forgotten
        assert sampler.sample([]).members == []
    finally:
        child.kill()
        child.wait()


async def test_busy_child_has_non_zero_metrics(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    async with running(tmp_path / "state") as (sup, rec):
        status = await sup.place(spec("busy", script("busy.py", out)))
        assert status.pid is not None
        proc = psutil.Process(status.pid)
        # The child has opened its files and written its MiB once this shows.
        await until(lambda: out.exists() and out.stat().st_size == 1 << 20)
        await until(lambda: proc.cpu_times().user > 0.05)
        await sup.tick()
        await sup.tick()
        m = rec.last("busy").metrics
        assert m is not None
        assert m.cpu_percent > 10
        assert m.rss_bytes > 1 << 20
        assert m.threads >= 3  # two spinning threads + the sleep child
        assert m.open_fds >= 5
        assert m.io_write_bytes >= 1 << 20
        assert m.children >= 1
        assert m.zombies == 0


def test_node_metrics(tmp_path: Path) -> None:
    m = node_metrics(tmp_path)
    assert m.memory_total_bytes > 0
    assert m.load1 >= 0
    assert m.disk_total_bytes > 0


def test_tick_cost_is_small_for_many_idle_processes() -> None:
    """Sampling 100 sleeping processes: well under 1 ms each (5 s tick budget)."""
    procs = [subprocess.Popen(["sleep", "100"]) for _ in range(100)]
    try:
        sampler = TreeSampler()
        sampler.sample(p.pid for p in procs)
        sampler.end_tick()
        t0 = time.perf_counter()
        table = ProcTable.scan()
        for p in procs:
            sampler.sample([p.pid, *table.descendants(p.pid)])
        sampler.end_tick()
        per_process = (time.perf_counter() - t0) / len(procs)
        assert per_process < 1e-3
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
