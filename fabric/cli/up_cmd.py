"""`fabric up`: run a whole local fabric in the foreground (see :mod:`fabric.up`)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from fabric.cli import CommandFailed, UsageError
from fabric.env import DEFAULT_STATE_DIR
from fabric.up import LocalFabric, UpConfig, UpError

__all__ = ["register"]

MAX_NODES = 64


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "up",
        help="run a local fabric (NATS, controller, node agents) in the foreground",
        description=(
            "Start an embedded TLS nats-server with JetStream, a controller and N node"
            " agents, write STATE/fabric.env for the CLI, and wait. Ctrl-C or SIGTERM stops"
            " everything in order (nodes drain their agents first) and exits 0. Running it"
            " again on the same state directory brings the same deployments back."
        ),
    )
    parser.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        metavar="DIR",
        help="PKI, JetStream, node state and logs (default ./.fabric)",
    )
    parser.add_argument("--nodes", default="1", metavar="N", help="node agents (default 1)")
    parser.add_argument(
        "--port",
        default="4222",
        metavar="P",
        help="NATS client port (default 4222; if busy, an error: pass 0 for any free port)",
    )
    parser.add_argument(
        "--metrics-port",
        metavar="P",
        help="serve the controller's Prometheus metrics on 127.0.0.1:P (default: off)",
    )
    parser.set_defaults(handler=_up)


def _int(text: str, flag: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{flag} must be from {low} to {high}, not {value}")
    return value


def _say(text: str) -> None:
    print(text, flush=True)


def _up(args: argparse.Namespace) -> int:
    config = UpConfig(
        state_dir=Path(args.state_dir).expanduser().resolve(),
        nodes=_int(args.nodes, "--nodes", 1, MAX_NODES),
        port=_int(args.port, "--port", 0, 65535),
        metrics_port=(
            None
            if args.metrics_port is None
            else _int(args.metrics_port, "--metrics-port", 1, 65535)
        ),
    )
    return asyncio.run(_main(config))


async def _main(config: UpConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fabric = LocalFabric(config, _say)
    try:
        starting = asyncio.create_task(fabric.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            # Interrupted while starting: what started is stopped below.
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        starting.result()
        _what_now(fabric)
        await fabric.watch(stop)
        return 0
    except UpError as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        try:
            await fabric.stop()
        finally:
            if fabric.server is not None:
                _say("stopped")
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _what_now(fabric: LocalFabric) -> None:
    here = Path.cwd().resolve()
    state = fabric.config.state_dir
    found_here = state == here / ".fabric"
    flag = "" if found_here else f" --state-dir {state}"
    lines = [
        "",
        f"fabric is up ({len(fabric.nodes)} node{'s' if len(fabric.nodes) != 1 else ''})."
        " In another terminal:",
        "",
        f"  fabric run{flag} web -- python3 -m http.server 0",
        f"  fabric ps{flag}",
        f"  fabric logs{flag} -f web",
        "",
        f"Settings for other tools: . {fabric.env_path}",
        *(
            [f"Prometheus metrics: http://127.0.0.1:{fabric.config.metrics_port}/metrics"]
            if fabric.config.metrics_port is not None
            else []
        ),
        "Ctrl-C stops the fabric.",
    ]
    print("\n".join(lines), flush=True)
    sys.stdout.flush()
