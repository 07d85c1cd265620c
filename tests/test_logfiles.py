"""Log files: rotation at spawn and while running, tail, follow."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agents.harness import running, script, spec, until

from node_agent.logfiles import LogFiles
from schemas.agent import AgentState, LogSpec

SMALL = LogSpec(max_bytes=4096, backups=2)


def write(fd: int, n: int, tag: str) -> None:
    for i in range(n):
        os.write(fd, f"{tag} {i:04d} {'y' * 50}\n".encode())


def test_rotation_at_spawn_renames_and_keeps_backups(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    for run in range(4):
        out, err = logs.open_for_spawn("a", SMALL)
        write(out, 100, f"run{run}")  # ~6 KB, over max_bytes
        os.close(out)
        os.close(err)
    logs.open_for_spawn("a", SMALL)  # the 5th spawn rotates once more
    assert logs.path("a", "stdout").stat().st_size == 0
    assert logs.tail("a", "stdout", 1) == []
    backups = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert backups == ["stderr.log", "stdout.log", "stdout.log.1", "stdout.log.2"]
    assert logs.path("a", "stdout", 1).read_text().startswith("run3 0000")
    assert logs.path("a", "stdout", 2).read_text().startswith("run2 0000")


def test_copy_truncate_keeps_the_writer_appending(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    out, err = logs.open_for_spawn("a", SMALL)
    try:
        write(out, 100, "old")
        assert logs.rotate_if_needed("a", SMALL) == ["stdout"]
        assert logs.rotate_if_needed("a", SMALL) == []
        write(out, 1, "new")  # O_APPEND: lands at the new end, no hole
        assert logs.path("a", "stdout").read_text().startswith("new 0000")
        assert logs.path("a", "stdout", 1).read_text().count("\n") == 100
    finally:
        os.close(out)
        os.close(err)


def test_no_backups_means_truncate(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    spec0 = LogSpec(max_bytes=4096, backups=0)
    out, err = logs.open_for_spawn("a", spec0)
    write(out, 100, "x")
    logs.rotate_if_needed("a", spec0)
    os.close(out)
    os.close(err)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["stderr.log", "stdout.log"]


def test_tail(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    out, err = logs.open_for_spawn("a", LogSpec())
    write(out, 5000, "line")  # > one 64 KiB block
    os.close(out)
    os.close(err)
    last = logs.tail("a", "stdout", 3)
    assert [line.split()[1] for line in last] == ["4997", "4998", "4999"]
    assert len(logs.tail("a", "stdout", 4000)) == 4000
    assert logs.tail("a", "stdout", 0) == []
    assert logs.tail("missing", "stdout", 3) == []


async def test_follow_sees_new_lines_and_rotation(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    out, err = logs.open_for_spawn("a", SMALL)
    write(out, 1, "before")
    lines = logs.follow("a", "stdout", interval=0.01, from_start=True)
    try:
        assert (await asyncio.wait_for(anext(lines), 5)).startswith("before 0000")
        write(out, 1, "after")
        assert (await asyncio.wait_for(anext(lines), 5)).startswith("after 0000")
        write(out, 100, "big")
        for _ in range(100):
            await asyncio.wait_for(anext(lines), 5)
        logs.rotate_if_needed("a", SMALL)
        write(out, 1, "rotated")
        assert (await asyncio.wait_for(anext(lines), 5)).startswith("rotated 0000")
    finally:
        await lines.aclose()
        os.close(out)
        os.close(err)


async def test_supervised_agent_logs_rotate_on_tick(tmp_path: Path) -> None:
    async with running(tmp_path) as (sup, _rec):
        await sup.place(spec("spam", script("spam.py", 200), logs=SMALL))
        stdout = tmp_path / "logs" / "spam" / "stdout.log"
        await until(lambda: (tmp_path / "logs" / "spam" / "stderr.log").stat().st_size > 0)
        assert stdout.stat().st_size == 200 * 100
        await sup.tick()
        assert stdout.stat().st_size == 0
        assert (tmp_path / "logs" / "spam" / "stdout.log.1").stat().st_size == 200 * 100
        assert sup.tail_logs("spam", "stderr", 1) == ["done"]
        assert sup.status("spam").state is AgentState.RUNNING


def test_tail_since_starts_at_the_last_mark_before_then(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path)
    path = logs.path("a", "stdout")
    path.parent.mkdir(parents=True)
    path.write_text("old 1\nold 2\n")
    logs.mark("a", "stdout", 100.0, path.stat().st_size)
    with path.open("a") as f:
        f.write("new 1\nnew 2\n")
    logs.mark("a", "stdout", 105.0, path.stat().st_size)
    assert logs.tail("a", "stdout", 10, since=102.0) == ["new 1", "new 2"]
    assert logs.tail("a", "stdout", 1, since=102.0) == ["new 2"]
    assert logs.tail("a", "stdout", 10, since=50.0) == ["old 1", "old 2", "new 1", "new 2"]
    assert logs.tail("a", "stdout", 10, since=200.0) == []
    # A truncation (rotation) drops the marks: the whole new file counts.
    path.write_text("fresh\n")
    logs.mark("a", "stdout", 110.0, path.stat().st_size)
    assert logs.tail("a", "stdout", 10, since=102.0) == ["fresh"]
