"""Health verdict logic (pure) and the probes against real local servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from node_agent import health as health_module
from node_agent.health import (
    CheckFailed,
    HealthJudge,
    HealthMonitor,
    http_status,
    run_exec,
    tcp_connect,
)
from node_agent.reaper import ChildReaper
from schemas.agent import HealthSpec, HealthVerdict, ProcessCheck

H = HealthVerdict


def test_all_exports_exist() -> None:
    for name in health_module.__all__:
        assert hasattr(health_module, name)


@pytest.mark.parametrize(
    ("failure", "success", "results", "expected"),
    [
        (3, 1, [], []),
        (3, 1, [True], [H.HEALTHY]),
        (3, 2, [True, True], [H.UNKNOWN, H.HEALTHY]),
        (3, 1, [False, False, False], [H.DEGRADED, H.DEGRADED, H.UNHEALTHY]),
        (1, 1, [False], [H.UNHEALTHY]),
        (2, 1, [True, False, True], [H.HEALTHY, H.DEGRADED, H.HEALTHY]),
        # Unhealthy needs the full success count, and stays unhealthy on a relapse.
        (
            2,
            2,
            [False, False, True, False, True, True],
            [H.DEGRADED, H.UNHEALTHY, H.UNHEALTHY, H.UNHEALTHY, H.UNHEALTHY, H.HEALTHY],
        ),
        (
            3,
            2,
            [True, True, False, True, True],
            [H.UNKNOWN, H.HEALTHY, H.DEGRADED, H.DEGRADED, H.HEALTHY],
        ),
    ],
)
def test_judge_table(
    failure: int, success: int, results: list[bool], expected: list[HealthVerdict]
) -> None:
    judge = HealthJudge(failure, success)
    assert judge.verdict is H.UNKNOWN
    assert [judge.record(ok) for ok in results] == expected


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A tiny asyncio HTTP server answering with the status in the request path."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        code = head.split()[1].decode().split("?")[0].strip("/") or "200"
        writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, requests


async def test_http_status(http_server: tuple[int, list[bytes]]) -> None:
    port, requests = http_server
    assert await http_status(f"http://127.0.0.1:{port}/503") == 503
    assert await http_status(f"http://127.0.0.1:{port}/204?x=1") == 204
    assert requests[1].startswith(b"GET /204?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_http_garbage_and_refused() -> None:
    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-nope\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(junk, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ValueError, match="not an HTTP status line"):
            await http_status(f"http://127.0.0.1:{port}/")
    with pytest.raises(OSError):
        await http_status(f"http://127.0.0.1:{port}/")
    with pytest.raises(OSError):
        await tcp_connect("127.0.0.1", port)


async def test_run_exec_codes_and_timeout_kill() -> None:
    reaper = ChildReaper()
    reaper.start()
    try:
        assert await run_exec(reaper, ["true"]) == 0
        assert await run_exec(reaper, ["sh", "-c", "exit 7"]) == 7
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await run_exec(reaper, ["sleep", "100"])
        assert time.monotonic() - t0 < 2.0
        assert reaper.watched == 0  # the killed check was reaped, not left behind
    finally:
        reaper.close()


async def test_monitor_reports_changes_only() -> None:
    answers = iter([True, True, False, False, True])
    done = asyncio.Event()
    changes: list[tuple[HealthVerdict, str]] = []

    async def probe() -> None:
        try:
            ok = next(answers)
        except StopIteration:
            done.set()
            await asyncio.Event().wait()
        if not ok:
            raise CheckFailed("nope")

    spec = HealthSpec(check=ProcessCheck(), interval=0.001, failure_threshold=2)
    monitor = HealthMonitor(spec, probe, lambda v, e: changes.append((v, e)))
    task = asyncio.create_task(monitor.run())
    async with asyncio.timeout(5):
        await done.wait()
    task.cancel()
    assert changes == [
        (H.HEALTHY, ""),
        (H.DEGRADED, "nope"),
        (H.UNHEALTHY, "nope"),
        (H.HEALTHY, ""),
    ]
