"""`fabric controller run`: run one controller in the foreground until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
from pathlib import Path

from fabric.cli import CommandFailed, UsageError
from fabric.connect import ConnectError, connect
from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.tokens import SIGNING_KEY, SIGNING_PUB
from schemas.ids import is_valid_id

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "controller", help="the controller", description="Run a fabric controller."
    )
    verbs = parser.add_subparsers(dest="controller_verb", metavar="ACTION")
    verbs.required = True
    run = verbs.add_parser("run", help="run a controller in the foreground")
    run.add_argument("--name", required=True, metavar="ID", help="this controller's name")
    run.add_argument("--url", metavar="URL", help="NATS URL(s), comma separated ($FABRIC_NATS_URL)")
    run.add_argument("--ca", type=Path, metavar="PATH", help="CA certificate ($FABRIC_CA)")
    run.add_argument("--cert", type=Path, metavar="PATH", help="client certificate ($FABRIC_CERT)")
    run.add_argument("--key", type=Path, metavar="PATH", help="client key ($FABRIC_KEY)")
    run.add_argument(
        "--pki", type=Path, metavar="DIR", help=f"PKI directory: {SIGNING_KEY} and {SIGNING_PUB}"
    )
    run.add_argument("--signing-key", type=Path, metavar="PATH", help="key minting commands")
    run.add_argument(
        "--verify-key", type=Path, action="append", metavar="PATH", help="token key (repeatable)"
    )
    # Strings, converted by the handler: argparse's type errors are two lines.
    run.add_argument("--node-timeout", default="1.5", metavar="SECONDS")
    run.add_argument("--heartbeat-interval", default="0.5", metavar="SECONDS")
    run.add_argument("--lease-ttl", default="3", metavar="SECONDS")
    run.add_argument("--replicas", default="0", metavar="N", help="KV/stream replicas (0: auto)")
    run.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics (0: any port)"
    )
    run.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST", help="(127.0.0.1)")
    run.add_argument(
        "--allow-root-agents",
        action="store_true",
        help="admit specs whose user or group is root (default: refuse, spec_root_forbidden;"
        " each node also needs fabric-node --allow-root-agents)",
    )
    run.add_argument(
        "--allow-untokened-tasks",
        action="store_true",
        help="admit tasks that carry no submit token (default: refuse them, token_missing)",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number of seconds, not {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{what} must be positive, not {text!r}")
    return value


def _config(args: argparse.Namespace) -> ControllerConfig:
    if not is_valid_id(args.name):
        raise UsageError(f"--name {args.name!r} is not a valid id")
    signing = args.signing_key or (args.pki / SIGNING_KEY if args.pki else None)
    verify = tuple(args.verify_key or ([args.pki / SIGNING_PUB] if args.pki else []))
    if signing is None or not verify:
        raise UsageError("give --pki, or --signing-key and --verify-key")
    try:
        replicas = int(args.replicas)
    except ValueError:
        raise UsageError(f"--replicas must be a number, not {args.replicas!r}") from None
    if replicas < 0:
        raise UsageError("--replicas must be 0 (auto) or more")
    lease_ttl = _seconds(args.lease_ttl, "--lease-ttl")
    return ControllerConfig(
        name=args.name,
        signing_key=signing,
        verify_keys=verify,
        node_timeout=_seconds(args.node_timeout, "--node-timeout"),
        heartbeat_interval=_seconds(args.heartbeat_interval, "--heartbeat-interval"),
        lease_ttl=lease_ttl,
        streams=StreamSettings(replicas=replicas or None, lease_ttl=lease_ttl),
        allow_root_agents=args.allow_root_agents,
        require_submit_token=not args.allow_untokened_tasks,
    )


async def _main(args: argparse.Namespace, config: ControllerConfig) -> None:
    try:
        nc = await connect(
            args.url, ca=args.ca, cert=args.cert, key=args.key, name=f"controller-{config.name}"
        )
    except ConnectError as exc:
        raise CommandFailed(str(exc)) from None
    try:
        controller = Controller(nc, config)
    except (OSError, ValueError) as exc:
        await nc.close()
        raise CommandFailed(f"cannot load keys: {exc}") from None
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (systemd, docker stop) ends the run like Ctrl-C: the lease is
    # released on the way out, so a standby takes over at once.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        if args.metrics_port is None:
            await controller.run()
        else:
            from fabric.prometheus import run_with_metrics

            await run_with_metrics(controller, args.metrics_host, args.metrics_port)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await nc.close()


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM cancels the main task; that is the normal way out, not an error.
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_main(args, config))
    return 0
