"""`fabric dashboard [--port P] [--host H]`: serve the web dashboard.

The page shows nodes, agents and a live event feed. The server watches the
fleet with the ``viewer`` identity that `fabric up` issues
(``STATE/pki/viewer.crt``): it can read, never change anything. Without a
viewer certificate next to the fabric's settings it uses the operator's, and
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from pathlib import Path

from fabric.cli import CommandFailed, UsageError
from fabric.client import add_client_options, open_client
from fabric.env import FabricEnv, NoFabricError, find_fabric

__all__ = ["register", "viewer_env"]

VIEWER = "viewer"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dash = subparsers.add_parser(
        "dashboard",
        help="serve the web dashboard (nodes, agents, live events)",
        description=(
            "Serve a web page showing nodes, agents and a live event feed, on loopback"
            " by default. Runs until Ctrl-C."
        ),
    )
    dash.add_argument("--port", default="8470", metavar="P", help="port (8470; 0: any free)")
    dash.add_argument("--host", default="127.0.0.1", metavar="HOST", help="(127.0.0.1)")
    add_client_options(dash)
    dash.set_defaults(handler=_dashboard)


def viewer_env(env: FabricEnv) -> tuple[FabricEnv, bool]:
    """The fabric's settings with the viewer's certificate, when it can be found."""
    pki_dirs = [env.state_dir / "pki"] if env.state_dir else []
    pki_dirs.append(env.cert.parent)
    for pki in pki_dirs:
        cert, key = pki / f"{VIEWER}.crt", pki / f"{VIEWER}.key"
        if cert.is_file() and key.is_file():
            return dataclasses.replace(env, cert=cert, key=key, token_key=None), True
    return env, False


def _dashboard(args: argparse.Namespace) -> int:
    try:
        port = int(args.port)
    except ValueError:
        raise UsageError(f"--port must be a number, not {args.port!r}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, not {port}")
    try:
        env = find_fabric(Path(args.state_dir) if args.state_dir else None)
    except NoFabricError as exc:
        raise CommandFailed(str(exc)) from None
    env, is_viewer = viewer_env(env)
    if not is_viewer:
        print(
            f"fabric: note: no {VIEWER}.crt found; watching with {env.cert.name}",
            file=sys.stderr,
        )
    return asyncio.run(_serve(env, args.host, port))


async def _serve(env: FabricEnv, host: str, port: int) -> int:
    from fabric.dashboard import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        print(f"dashboard on {url}  (Ctrl-C stops it)", flush=True)

    try:
        async with open_client(env=env, name="fabric-dashboard") as client:
            await serve(client, host, port, ready, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
