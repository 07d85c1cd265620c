"""The web dashboard in real headless Chromium, against a real `fabric up`.

Chromium is driven over the DevTools protocol (one websocket to the browser,
a flattened session on the page). The page is loaded once; an agent started
afterwards must appear as running, and its stop must show, with no reload.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_up import UpProcess, module_fabric

from fabric.cli.dashboard_cmd import viewer_env
from fabric.client import open_client
from fabric.env import find_fabric
from schemas.agent import AgentSpec
from schemas.api import CreateDeployment, DeleteDeployment, Deployment
from schemas.command import StopAgent

websockets = pytest.importorskip("websockets")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
_URL = re.compile(r"dashboard on (http://\S+)")
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=1)


async def eventually(what: str, probe: Callable[[], Any], within: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while loop.time() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.1)  # wait-ok: polled condition under a deadline
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _spawn(
    argv: list[str], out: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with out.open("wb") as fh:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid; its process group (its own session) is killed if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers left by chromium, if any


@contextlib.asynccontextmanager
async def dashboard(fabric: UpProcess, tmp: Path) -> AsyncIterator[str]:
    out = tmp / "dashboard.out"
    proc = _spawn(
        [sys.executable, "-m", "fabric", "dashboard", "--port", "0"],
        out,
        env={**fabric.env()},
    )
    try:

        def url() -> str | None:
            assert proc.poll() is None, out.read_text()
            match = _URL.search(out.read_text())
            return match.group(1) if match else None

        yield await eventually("the dashboard's url", url)
    finally:
        _stop(proc)
        assert proc.returncode == 0, out.read_text()


class Page:
    """One page over the DevTools protocol (flattened session on the browser socket)."""

    def __init__(self, ws: Any, session: str) -> None:
        self.ws = ws
        self.session = session
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, ws: Any, url: str) -> Page:
        target = await cls._call(ws, None, "Target.createTarget", {"url": url}, itertools.count(1))
        attached = await cls._call(
            ws,
            None,
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            itertools.count(100),
        )
        return cls(ws, attached["sessionId"])

    @staticmethod
    async def _call(
        ws: Any, session: str | None, method: str, params: dict[str, Any], ids: Iterator[int]
    ) -> dict[str, Any]:
        msg_id = next(ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await ws.send(json.dumps(message))
        async with asyncio.timeout(10):
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id and reply.get("sessionId") == session:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]  # type: ignore[no-any-return]

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._call(self.ws, self.session, method, params or {}, self.ids)

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Any]:
    assert CHROMIUM is not None
    profile = tmp / "chromium-profile"
    proc = _spawn([CHROMIUM, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}"], tmp / "chromium.out")
    try:
        port_file = profile / "DevToolsActivePort"

        def endpoint() -> str | None:
            assert proc.poll() is None, (tmp / "chromium.out").read_text()[-2000:]
            with contextlib.suppress(OSError):
                lines = port_file.read_text().split()
                if len(lines) == 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            return None

        url = await eventually("chromium's DevTools endpoint", endpoint)
        async with websockets.connect(url, max_size=64 << 20) as ws:
            yield ws
    finally:
        _stop(proc)


def _row_state(kind: str, name: str) -> str:
    return f"(document.querySelector('tr[data-{kind}=\"{name}\"]')?.dataset.state ?? null)"


async def test_page_follows_an_agent_without_reloading(fabric: UpProcess, tmp_path: Path) -> None:
    env = find_fabric(fabric.state_dir)
    assert viewer_env(env)[0].cert.name == "viewer.crt"
    async with (
        dashboard(fabric, tmp_path) as url,
        chromium(tmp_path) as browser,
        open_client(env=env) as client,
    ):
        page = await Page.open(browser, url)
        await eventually(
            "the page connected with local-1 ready",
            lambda: page.js(
                f"document.getElementById('status').dataset.connected === 'yes'"
                f" && {_row_state('node', 'local-1')} === 'ready'"
            ),
        )
        await page.js("window.__loadedOnce = 'still here'")
        assert await page.js(_row_state("agent", "dash-web")) is None

        spec = AgentSpec(name="dash-web", argv=[sys.executable, "-m", "http.server", "0"])
        await client.api("create", CreateDeployment(deployment=Deployment(spec=spec)))
        await eventually(
            "dash-web running on the page",
            lambda: page.js(f"{_row_state('agent', 'dash-web')} === 'running'"),
        )
        await eventually(
            "the deployment.created event in the feed",
            lambda: page.js(
                "!!document.querySelector('#events li[data-kind=\"deployment.created\"]')"
            ),
        )
        shot = await page.call("Page.captureScreenshot", {"format": "png"})
        _save(tmp_path / "dashboard.png", shot["data"])

        await client.command("dash-web", StopAgent())
        await eventually(
            "dash-web stopped on the page",
            lambda: page.js(f"{_row_state('agent', 'dash-web')} === 'stopped'"),
        )
        assert await page.js("window.__loadedOnce") == "still here"
        await client.api("delete", DeleteDeployment(name="dash-web"))


def _save(path: Path, data: str) -> None:
    """A picture of the page, kept beside the test's files for a person to look at."""
    path.write_bytes(base64.b64decode(data))
