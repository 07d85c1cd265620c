"""``fabric-node``: the per-host node agent.

Reads flags, falling back to ``FABRIC_*`` environment variables, then runs
the supervisor and its NATS face until SIGTERM/SIGINT (or a shutdown
command). Exit codes: 0 after a clean shutdown, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fabric import __version__
from fabric.tokens import TokenVerifier
from node_agent.config import NodeAgentConfig, default_node_id, env_path
from node_agent.service import NodeAgent
from schemas.errors import ContractError

__all__ = ["build_parser", "main"]


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be KEY=VALUE, not {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fabric-node",
        description=(
            "The agent-fabric node agent: spawns, watches, restarts and measures local "
            "processes and reports them on NATS (mutual TLS). Flags fall back to the "
            "FABRIC_* environment variables shown."
        ),
    )
    p.add_argument("--version", action="version", version=f"fabric-node {__version__}")
    p.add_argument(
        "--node-id",
        default=os.environ.get("FABRIC_NODE_ID"),
        help="this node's id, [a-z0-9][a-z0-9_-]{0,62}; must equal the CN of its node "
        "certificate (env FABRIC_NODE_ID; default: the short host name)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=env_path("FABRIC_NODE_STATE_DIR") or Path("/var/lib/agent-fabric/node"),
        help="where specs, pids and logs are kept (env FABRIC_NODE_STATE_DIR; "
        "default /var/lib/agent-fabric/node)",
    )
    p.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label for placement (repeatable)",
    )
    p.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="TYPE",
        help="a task type this node offers (repeatable)",
    )
    p.add_argument(
        "--nats-url",
        default=os.environ.get("FABRIC_NATS_URL"),
        help="NATS URL(s), comma-separated (env FABRIC_NATS_URL)",
    )
    p.add_argument("--ca", type=Path, default=env_path("FABRIC_CA"), help="CA cert (env FABRIC_CA)")
    p.add_argument(
        "--cert", type=Path, default=env_path("FABRIC_CERT"), help="node cert (env FABRIC_CERT)"
    )
    p.add_argument(
        "--key", type=Path, default=env_path("FABRIC_KEY"), help="node key (env FABRIC_KEY)"
    )
    p.add_argument(
        "--token-key",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="public key whose command tokens are accepted (repeatable; env "
        "FABRIC_TOKEN_KEYS, comma-separated; default: signing.pub next to the CA)",
    )
    p.add_argument(
        "--worker-cert",
        type=Path,
        default=env_path("FABRIC_WORKER_CERT"),
        help="worker certificate passed to agents as FABRIC_CERT (env FABRIC_WORKER_CERT)",
    )
    p.add_argument(
        "--worker-key",
        type=Path,
        default=env_path("FABRIC_WORKER_KEY"),
        help="worker key passed to agents as FABRIC_KEY (env FABRIC_WORKER_KEY)",
    )
    p.add_argument(
        "--allow-root-agents",
        action="store_true",
        default=_env_flag("FABRIC_ALLOW_ROOT_AGENTS"),
        help="run specs whose user is uid 0 or group gid 0 (env FABRIC_ALLOW_ROOT_AGENTS=1; "
        "default: refuse them, spec_root_forbidden)",
    )
    p.add_argument(
        "--agent-cwd-root",
        type=Path,
        default=env_path("FABRIC_AGENT_CWD_ROOT"),
        metavar="DIR",
        help="an agent's cwd must be DIR or below it (env FABRIC_AGENT_CWD_ROOT; "
        "default: any absolute path)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--metrics-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument(
        "--on-sigterm",
        choices=("drain", "detach"),
        default="drain",
        help="drain: stop every agent gracefully (default); detach: leave them running "
        "for the next node agent to re-adopt (upgrades)",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _token_keys(args: argparse.Namespace) -> tuple[Path, ...]:
    keys = list(args.token_key)
    env = os.environ.get("FABRIC_TOKEN_KEYS", "")
    keys += [Path(k) for k in env.split(",") if k.strip()]
    if not keys and args.ca is not None and (args.ca.parent / "signing.pub").exists():
        keys.append(args.ca.parent / "signing.pub")
    return tuple(keys)


def _config(args: argparse.Namespace) -> NodeAgentConfig:
    node_id = args.node_id or default_node_id()
    keys = _token_keys(args)
    if not keys:
        raise ValueError("no token key: pass --token-key PEM (the operator's signing.pub)")
    return NodeAgentConfig(
        node_id=node_id,
        state_dir=args.state_dir,
        token_keys=keys,
        nats_urls=args.nats_url,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        labels=dict(args.label),
        capabilities=tuple(args.capability),
        heartbeat_interval=args.heartbeat_interval,
        metrics_interval=args.metrics_interval,
        on_sigterm=args.on_sigterm,
        worker_cert=args.worker_cert,
        worker_key=args.worker_key,
        allow_root_agents=args.allow_root_agents,
        agent_cwd_root=args.agent_cwd_root,
    )


async def _run(config: NodeAgentConfig, verifier: TokenVerifier) -> None:
    agent = NodeAgent(config, verifier)
    loop = asyncio.get_running_loop()

    def on_signal(_signum: int, _frame: object) -> None:
        # A plain handler rather than loop.add_signal_handler: that one only
        # learns of a signal through the loop's wake-up pipe, which a storm of
        # SIGCHLDs from many exiting agents can fill, dropping a SIGTERM.
        loop.call_soon_threadsafe(agent.request_shutdown)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    pass_default_signals_on()
    await agent.run()


# Signals a node agent never acts on, but its agents may be sent (`fabric
# signal web HUP`) or rely on (SIGQUIT for a thread dump).
_PASSED_ON = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def pass_default_signals_on() -> None:
    """Agents start with these signals at their default, however the node was started.

    An ignored signal stays ignored across exec, and a node started by
    ``nohup`` or as a shell's background job has SIGHUP or SIGQUIT ignored:
    every agent would inherit that, and a signal an operator sends it would
    do nothing. A handler is reset to the default in each child (spawning
    uses no ``preexec_fn``, which would cost a full fork), so an ignored one
    is replaced by a handler that ignores it here too.
    """
    for signum in _PASSED_ON:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _still_ignored)


def _still_ignored(_signum: int, _frame: object) -> None:
    return


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        config = _config(args)
        verifier = TokenVerifier.from_files(*config.token_keys)
    except (ValueError, OSError) as exc:
        print(f"fabric-node: error: {exc}", file=sys.stderr)
        return 2
    except ContractError as exc:
        print(f"fabric-node: error: {exc.message}", file=sys.stderr)
        return 2
    config.state_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_run(config, verifier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
