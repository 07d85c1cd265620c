"""The dashboard's small local HTTP server (aiohttp, asyncio only).

Routes::

    GET /                 the page (static/index.html)
    GET /static/<file>    its script and style sheet
    GET /api/snapshot     the fleet view now, as JSON
    GET /api/stream       server-sent events: ``snapshot`` first, then
                          ``agent``, ``agent_removed``, ``node`` and ``event``
                          as the view changes (see :class:`fabric.live.Change`)

The view is one :class:`fabric.live.FleetView` for every page, kept by the
NATS subscriptions of :func:`fabric.live.follow`; each page connected to the
stream has a bounded queue, and one that falls behind is sent a fresh
snapshot instead of the changes it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from fabric.cli import CommandFailed
from fabric.client import FabricClient
from fabric.live import Change, FleetView, follow

__all__ = ["Dashboard", "serve"]

log = logging.getLogger(__name__)

_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}
_QUEUE = 2000
_KEEPALIVE = 15.0


def _frame(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(eq=False, slots=True)
class _Page:
    """One connected page: its frames to send, and whether it fell behind."""

    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(_QUEUE))
    behind: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Dashboard:
    """The web face of one :class:`FleetView`."""

    def __init__(self, view: FleetView, title: str = "agent-fabric") -> None:
        self.view = view
        self.title = title
        self.pages: set[_Page] = set()
        view.listeners.append(self._on_change)

    def _on_change(self, change: Change) -> None:
        frame = _frame(change.kind, change.data)
        for page in self.pages:
            if page.behind:
                continue
            try:
                page.queue.put_nowait(frame)
            except asyncio.QueueFull:
                page.behind = True
                page.wake.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/stream", self._stream)
        return app

    @staticmethod
    def _file(name: str) -> bytes:
        return resources.files("fabric.dashboard").joinpath("static", name).read_bytes()

    async def _index(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._file("index.html"), content_type="text/html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._file(name),
            content_type=_STATIC[name],
            headers={"Cache-Control": "no-cache"},
        )

    async def _snapshot(self, _request: web.Request) -> web.Response:
        return web.json_response({"title": self.title, **self.view.snapshot()})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        page = _Page()
        self.pages.add(page)
        try:
            await response.write(_frame("snapshot", {"title": self.title, **self.view.snapshot()}))
            while True:
                if page.behind:
                    while not page.queue.empty():
                        page.queue.get_nowait()
                    page.behind = False
                    await response.write(
                        _frame("snapshot", {"title": self.title, **self.view.snapshot()})
                    )
                    continue
                frame = await self._next(page)
                await response.write(frame if frame is not None else b": keep-alive\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self.pages.discard(page)
        return response

    @staticmethod
    async def _next(page: _Page) -> bytes | None:
        """The next frame; None after a quiet while (a keep-alive is due) or when behind."""
        if not page.queue.empty():
            return page.queue.get_nowait()
        page.wake.clear()
        get = asyncio.ensure_future(page.queue.get())
        woken = asyncio.ensure_future(page.wake.wait())
        try:
            done, _ = await asyncio.wait(
                {get, woken}, timeout=_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        return None


async def serve(
    client: FabricClient,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    stop: asyncio.Event,
) -> None:
    """Follow the fleet on ``client`` and serve the page until ``stop`` is set."""
    view = FleetView()
    dashboard = Dashboard(view)
    async with follow(client, view):
        runner = web.AppRunner(dashboard.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
            try:
                await site.start()
            except OSError as exc:
                raise CommandFailed(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            bound = runner.addresses[0]
            shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
            on_ready(f"http://{shown}:{bound[1]}/")
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await runner.cleanup()
