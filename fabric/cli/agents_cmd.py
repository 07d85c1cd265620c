"""Agent verbs: `fabric run`, `stop|start|restart|kill|pause|resume`, `rm`, `inspect`.

A NAME is a deployment (acting on every replica: ``web`` with three replicas
means ``web-0``, ``web-1``, ``web-2``) or a single agent id. `run` goes
through the controller's API (the desired state); the lifecycle verbs are
commands to the node hosting each agent, so a manual stop is the node's
record, and the controller leaves a stopped copy alone (it re-places only
copies it does not see at their epoch, or that failed).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg

from fabric.cli import CommandFailed, UsageError
from fabric.cli.output import human_bytes, print_json, spinner
from fabric.client import (
    FabricClient,
    FabricError,
    add_client_options,
    check_name,
    resolve,
    run_cli,
)
from schemas import subjects
from schemas.agent import AgentSpec, AgentState, AgentStatus, RestartPolicyKind, SignalName
from schemas.api import (
    CreateDeployment,
    DeleteDeployment,
    Deployment,
    DeploymentRecord,
    GetDeployment,
    UpdateDeployment,
    replica_ids,
)
from schemas.codec import decode
from schemas.command import (
    AgentCommand,
    PauseAgent,
    RestartAgent,
    ResumeAgent,
    SignalAgent,
    StartAgent,
    StatusAgent,
    StopAgent,
    TailLogs,
)
from schemas.discovery import DiscoverRequest
from schemas.errors import ContractError, ErrorCode

__all__ = ["register"]

_SIGNALS: tuple[str, ...] = SignalName.__args__  # type: ignore[attr-defined]
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_POLL = 0.5
_LOG_LINES = 10
_SETTLING = frozenset({AgentState.PENDING, AgentState.STARTING})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_run(subparsers)
    lifecycle = {
        "stop": "stop agents gracefully (stop signal, then SIGKILL after the timeout)",
        "start": "start stopped, exited or failed agents",
        "restart": "stop, then start agents",
        "kill": "send a signal (default SIGKILL); the restart policy then applies",
        "pause": "freeze agents (cgroup freezer or SIGSTOP)",
        "resume": "thaw paused agents",
    }
    for verb, text in lifecycle.items():
        p = subparsers.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}.")
        p.add_argument("names", nargs="+", metavar="NAME", help="deployment or agent id")
        if verb in ("stop", "restart"):
            p.add_argument(
                "-t", "--time", metavar="SECONDS", help="grace before SIGKILL (default: the spec's)"
            )
        if verb == "kill":
            p.add_argument("-s", "--signal", default="SIGKILL", metavar="SIG", help="(SIGKILL)")
        add_client_options(p)
        p.set_defaults(handler=_lifecycle, verb_name=verb)

    rm = subparsers.add_parser(
        "rm",
        help="delete deployments (their agents are stopped)",
        description="Delete deployments.",
    )
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--no-wait", action="store_true", help="do not wait until they are gone")
    add_client_options(rm)
    rm.set_defaults(handler=_rm)

    inspect = subparsers.add_parser(
        "inspect",
        help="spec, placement, state history and last exit of a deployment or agent",
        description="Show a deployment's spec and placement and each replica's state history.",
    )
    inspect.add_argument("name", metavar="NAME")
    inspect.add_argument("--json", action="store_true", help="the contract's JSON")
    add_client_options(inspect)
    inspect.set_defaults(handler=_inspect)


# --- run -----------------------------------------------------------------------


def _register_run(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = subparsers.add_parser(
        "run",
        help="run a command as a deployment and wait until it runs",
        description=(
            "Create (or update) deployment NAME running CMD, and wait until every replica"
            " is running. Replicas are named NAME (one) or NAME-0, NAME-1, ... The CLI adds"
            " PYTHONUNBUFFERED=1 to the environment unless --env sets it, so the output of"
            " Python agents reaches `fabric logs` at once."
        ),
        usage="fabric run NAME [options] -- CMD [ARGS...]",
    )
    run.add_argument("name", metavar="NAME")
    run.add_argument("command", nargs="*", metavar="CMD", help="the command, after --")
    run.add_argument("--replicas", default="1", metavar="N", help="copies to run (1)")
    run.add_argument("--label", action="append", default=[], metavar="K=V", help="(repeatable)")
    run.add_argument(
        "--capability", action="append", default=[], metavar="T", help="task type it handles"
    )
    run.add_argument(
        "--restart",
        default=RestartPolicyKind.ON_FAILURE.value,
        metavar="POLICY",
        help="never, always, on-failure (default), unless-stopped",
    )
    health = run.add_mutually_exclusive_group()
    health.add_argument("--health-http", metavar="URL", help="healthy on a 2xx/3xx answer")
    health.add_argument("--health-tcp", metavar="HOST:PORT", help="healthy when it connects")
    health.add_argument("--health-exec", metavar="CMD", help="healthy when CMD exits 0")
    run.add_argument("--memory", metavar="SIZE", help="memory ceiling, e.g. 512m, 2g")
    run.add_argument("--cpus", metavar="N", help="CPU ceiling, e.g. 0.5")
    run.add_argument("--env", action="append", default=[], metavar="K=V", help="(repeatable)")
    run.add_argument("--cwd", metavar="DIR", help="working directory on the node")
    run.add_argument("--no-wait", action="store_true", help="return once the fabric accepted it")
    run.add_argument("--timeout", default="60", metavar="SECONDS", help="wait at most (60)")
    add_client_options(run)
    run.set_defaults(handler=_run, command_argv=None)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} wants KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _number(text: str, flag: str, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number, not {text!r}") from None
    if value < 0 or value != value:
        raise UsageError(f"{flag} must not be negative, not {text!r}")
    return value


def parse_size(text: str) -> int:
    """``512m`` / ``2G`` / ``1.5gib`` / ``1048576`` -> bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise UsageError(f"--memory must be a size like 512m or 2g, not {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _health(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.health_http:
        return {"check": {"type": "http", "url": args.health_http}}
    if args.health_tcp:
        host, sep, port = args.health_tcp.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--health-tcp wants HOST:PORT, not {args.health_tcp!r}")
        return {"check": {"type": "tcp", "host": host or "127.0.0.1", "port": int(port)}}
    if args.health_exec:
        try:
            argv = shlex.split(args.health_exec)
        except ValueError as exc:
            raise UsageError(f"--health-exec: {exc}") from None
        return {"check": {"type": "exec", "argv": argv}}
    return None


def build_deployment(args: argparse.Namespace) -> Deployment:
    """The deployment `fabric run` asks for, validated against the contract (exit 2 if not)."""
    name = check_name(args.name)
    argv = list(args.command_argv or [])
    if args.command and argv:
        raise UsageError("give the command once, after --")
    argv = argv or list(args.command)
    if not argv:
        raise UsageError("no command: fabric run NAME [options] -- CMD [ARGS...]")
    try:
        policy = RestartPolicyKind(args.restart)
    except ValueError:
        choices = ", ".join(k.value for k in RestartPolicyKind)
        raise UsageError(f"--restart must be one of {choices}, not {args.restart!r}") from None
    env = _pairs(args.env, "--env")
    env.setdefault("PYTHONUNBUFFERED", "1")
    limits: dict[str, Any] = {}
    if args.memory:
        limits["memory_bytes"] = parse_size(args.memory)
    if args.cpus:
        limits["cpus"] = _number(args.cpus, "--cpus")
    spec: dict[str, Any] = {
        "name": name,
        "argv": argv,
        "env": env,
        "restart": {"policy": policy.value},
        "limits": limits,
        "labels": _pairs(args.label, "--label"),
        "capabilities": list(args.capability),
    }
    if args.cwd:
        spec["cwd"] = args.cwd
    health = _health(args)
    if health is not None:
        spec["health"] = health
    replicas = int(_number(args.replicas, "--replicas", integer=True))
    try:
        return msgspec.convert({"spec": spec, "replicas": replicas}, Deployment)
    except (msgspec.ValidationError, ValueError) as exc:
        # Field paths ($.spec.limits.memory_bytes) say which flag was wrong.
        raise UsageError(f"invalid deployment: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    deployment = build_deployment(args)
    limit = _number(args.timeout, "--timeout")
    return run_cli(args, lambda client: _run_async(client, deployment, args.no_wait, limit))


async def _run_async(
    client: FabricClient, deployment: Deployment, no_wait: bool, limit: float
) -> int:
    name = deployment.name
    ids = replica_ids(name, deployment.replicas) if deployment.replicas else []
    latest: dict[str, AgentStatus] = {}

    async def on_status(msg: Msg) -> None:
        try:
            status = decode(msg.data, AgentStatus)
        except ContractError:
            return
        _keep_newest(latest, status)

    # Subscribed before the create: the first statuses of a fast agent come
    # within milliseconds of the placement and must not be missed.
    subs = [await client.nc.subscribe(subjects.agent_status(i), cb=on_status) for i in ids]
    try:
        await client.nc.flush()
        verb = await _create_or_update(client, deployment)
        print(f"{verb} {name}", flush=True)
        if no_wait or not ids:
            return 0
        with spinner(f"waiting for {name} to run") as status_line:
            running = await _wait_running(client, name, ids, latest, limit, status_line.update)
        for status in running:
            pid = f"pid {status.pid}" if status.pid else "no pid"
            print(f"{status.agent_id} running on {status.node_id} ({pid})", flush=True)
        return 0
    finally:
        for sub in subs:
            await sub.unsubscribe()


def _keep_newest(latest: dict[str, AgentStatus], status: AgentStatus) -> None:
    old = latest.get(status.agent_id)
    if old is None or (status.epoch, status.since) >= (old.epoch, old.since):
        latest[status.agent_id] = status


async def _create_or_update(client: FabricClient, deployment: Deployment) -> str:
    try:
        result = await client.api("create", CreateDeployment(deployment=deployment))
        return "created" if result.changed else "unchanged:"
    except FabricError as exc:
        if exc.code is not ErrorCode.ALREADY_EXISTS:
            raise
    result = await client.api("update", UpdateDeployment(deployment=deployment))
    return "updated" if result.changed else "unchanged:"


class _RunFailed(Exception):
    def __init__(self, agent_id: str | None, message: str) -> None:
        super().__init__(message)
        self.agent_id = agent_id


async def _wait_running(
    client: FabricClient,
    name: str,
    ids: list[str],
    latest: dict[str, AgentStatus],
    limit: float,
    show: Callable[[str], None],
) -> list[AgentStatus]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    waiting = "not placed yet"
    try:
        while True:
            record = (await client.api("get", GetDeployment(name=name))).deployments[0]
            # Discovery as well as the subscription: an unchanged deployment
            # publishes nothing new, and its replicas may be running already.
            reply = await client.discover(DiscoverRequest(what="agents", ids=ids))
            for status in reply.agents:
                _keep_newest(latest, status)
            done, waiting = _progress(record, ids, latest)
            if done is not None:
                return done
            show(waiting)
            if loop.time() >= deadline:
                raise _RunFailed(None, f"{name} is not running after {limit:g}s: {waiting}")
            await asyncio.sleep(_POLL)
    except _RunFailed as exc:
        if exc.agent_id is not None:
            await _print_last_logs(client, exc.agent_id)
        raise CommandFailed(str(exc)) from None


def _progress(
    record: DeploymentRecord, ids: list[str], latest: dict[str, AgentStatus]
) -> tuple[list[AgentStatus] | None, str]:
    """(every replica's running status, or None; what is still awaited)."""
    placed = {p.agent_id: p for p in record.replicas}
    running: list[AgentStatus] = []
    pending: list[str] = []
    for agent_id in ids:
        p = placed.get(agent_id)
        if p is None or p.generation != record.generation:
            pending.append(f"{agent_id} not placed yet")
            continue
        if p.failed:
            raise _RunFailed(agent_id, f"{agent_id} failed on its node and elsewhere: {p.reason}")
        if p.node_id is None:
            if p.reason:
                raise _RunFailed(None, f"cannot place {agent_id}: {p.reason}")
            pending.append(f"{agent_id} not placed yet")
            continue
        status = latest.get(agent_id)
        if status is None or status.epoch < p.epoch or status.node_id != p.node_id:
            pending.append(f"{agent_id} placed on {p.node_id}")
            continue
        state = status.state
        if state is AgentState.RUNNING:
            running.append(status)
        elif state is AgentState.FAILED:
            raise _RunFailed(
                agent_id, f"{agent_id} failed: {status.reason or 'restart budget spent'}"
            )
        elif state in (AgentState.EXITED, AgentState.BACKOFF):
            how = _exit_text(status)
            tail = "; the fabric restarts it" if state is AgentState.BACKOFF else ""
            raise _RunFailed(agent_id, f"{agent_id} {how}{tail}")
        elif state is AgentState.STOPPED:
            raise _RunFailed(None, f"{agent_id} is stopped: `fabric start {record.name}`")
        else:
            pending.append(f"{agent_id} {state.value}")
    if pending:
        return None, ", ".join(pending)
    return running, ""


def _exit_text(status: AgentStatus) -> str:
    if status.exit_signal:
        return f"was killed by {status.exit_signal}"
    if status.exit_code is not None:
        return f"exited with code {status.exit_code}"
    return f"is {status.state.value}" + (f" ({status.reason})" if status.reason else "")


async def _print_last_logs(client: FabricClient, agent_id: str) -> None:
    for stream in ("stdout", "stderr"):
        try:
            result = await client.command(agent_id, TailLogs(stream=stream, lines=_LOG_LINES))
        except CommandFailed:
            return
        lines = result.logs.lines if result.logs else []
        if lines:
            print(f"last {stream} lines of {agent_id}:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()


# --- lifecycle -----------------------------------------------------------------


def _signal_name(text: str) -> str:
    name = text.upper()
    if name.isdigit():
        import signal

        try:
            name = signal.Signals(int(name)).name
        except ValueError:
            raise UsageError(f"unknown signal {text!r}") from None
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in _SIGNALS:
        raise UsageError(f"signal {text!r} is not allowed; choose from {', '.join(_SIGNALS)}")
    return name


def _command_for(args: argparse.Namespace) -> tuple[AgentCommand, float | None]:
    verb = args.verb_name
    grace = _number(args.time, "--time") if getattr(args, "time", None) else None
    if verb == "stop":
        return StopAgent(timeout=grace), grace
    if verb == "restart":
        return RestartAgent(), grace
    if verb == "kill":
        return SignalAgent(signal=_signal_name(args.signal)), None  # type: ignore[arg-type]
    commands: dict[str, AgentCommand] = {
        "start": StartAgent(),
        "pause": PauseAgent(),
        "resume": ResumeAgent(),
    }
    return commands[verb], None


def _lifecycle(args: argparse.Namespace) -> int:
    for name in args.names:
        check_name(name)
    command, grace = _command_for(args)
    return run_cli(args, lambda client: _lifecycle_async(client, args.names, command, grace))


async def _lifecycle_async(
    client: FabricClient, names: list[str], command: AgentCommand, grace: float | None
) -> int:
    targets = [await resolve(client, name) for name in names]
    jobs: list[tuple[str, float]] = []
    for target in targets:
        spec = target.spec
        # The node replies once the agent has stopped: allow its whole grace.
        stop_time = grace if grace is not None else (spec.stop_timeout if spec else 10.0)
        jobs += [(agent_id, stop_time + 5.0) for agent_id in target.agent_ids]
    if not jobs:
        raise CommandFailed(f"{', '.join(names)}: no replicas")

    unknown = {t.name for t in targets if t.record is None}

    async def one(agent_id: str, within: float) -> str | None:
        try:
            result = await client.command(agent_id, command, within=within)
            status = result.status
            if status is not None and isinstance(command, StartAgent | RestartAgent):
                status = await _settle(client, status)
        except FabricError as exc:
            if exc.code is ErrorCode.NOT_FOUND and agent_id in unknown:
                return f"no deployment or agent named {agent_id!r}"
            return str(exc)
        except CommandFailed as exc:
            return str(exc)
        print(f"{agent_id} {status.state.value if status else 'done'}", flush=True)
        return None

    async with asyncio.TaskGroup() as tg:
        tasks = [(agent_id, tg.create_task(one(agent_id, t))) for agent_id, t in jobs]
    failures = [(agent_id, task.result()) for agent_id, task in tasks if task.result()]
    for agent_id, error in failures:
        text = error if error and agent_id in error else f"{agent_id}: {error}"
        print(f"fabric: {text}", file=sys.stderr)
    return 1 if failures else 0


async def _settle(client: FabricClient, status: AgentStatus, limit: float = 60.0) -> AgentStatus:
    """Wait out `starting` (the spec's start_seconds) so start/restart report the outcome."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while status.state in _SETTLING and loop.time() < deadline:
        await asyncio.sleep(0.2)
        result = await client.command(status.agent_id, StatusAgent())
        if result.status is None:
            break
        status = result.status
    if status.state in (AgentState.BACKOFF, AgentState.EXITED, AgentState.FAILED):
        raise CommandFailed(f"{status.agent_id} {_exit_text(status)}")
    return status


# --- rm ------------------------------------------------------------------------


def _rm(args: argparse.Namespace) -> int:
    for name in args.names:
        check_name(name, "deployment name")
    return run_cli(args, lambda client: _rm_async(client, args.names, args.no_wait))


async def _rm_async(client: FabricClient, names: list[str], no_wait: bool) -> int:
    failed = False
    for name in names:
        try:
            await client.api("delete", DeleteDeployment(name=name))
        except FabricError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            print(f"fabric: no deployment {name!r}", file=sys.stderr)
            failed = True
            continue
        if not no_wait:
            with spinner(f"removing {name}"):
                await _wait_gone(client, name)
        print(f"removed {name}", flush=True)
    return 1 if failed else 0


async def _wait_gone(client: FabricClient, name: str, limit: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        try:
            await client.api("get", GetDeployment(name=name))
        except FabricError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return
            raise
        await asyncio.sleep(0.2)
    raise CommandFailed(f"{name} is still being removed after {limit:g}s")


# --- inspect -------------------------------------------------------------------


class Inspection(msgspec.Struct, kw_only=True):
    """`fabric inspect --json`: the deployment record and each replica's full status."""

    name: str
    deployment: DeploymentRecord | None
    agents: list[AgentStatus]


def _inspect(args: argparse.Namespace) -> int:
    check_name(args.name)
    return run_cli(args, lambda client: _inspect_async(client, args.name, args.json))


async def _inspect_async(client: FabricClient, name: str, as_json: bool) -> int:
    target = await resolve(client, name)
    statuses: list[AgentStatus] = []
    for agent_id in target.agent_ids:
        try:
            result = await client.command(agent_id, StatusAgent())
        except FabricError as exc:
            if exc.code is ErrorCode.NOT_FOUND and target.record is not None:
                continue  # a replica not placed (yet): the record says why
            if exc.code is ErrorCode.NOT_FOUND:
                raise FabricError(exc.code, f"no deployment or agent named {name!r}") from None
            raise
        if result.status is not None:
            statuses.append(result.status)
    inspection = Inspection(name=name, deployment=target.record, agents=statuses)
    if as_json:
        print_json(inspection)
    else:
        sys.stdout.write(_readable(inspection))
        sys.stdout.flush()
    return 0


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _spec_lines(spec: AgentSpec) -> list[str]:
    limits = msgspec.structs.asdict(spec.limits)
    shown = {k: v for k, v in limits.items() if v is not None}
    if "memory_bytes" in shown:
        shown["memory"] = human_bytes(shown.pop("memory_bytes"))
    health = "-"
    if spec.health is not None:
        check = msgspec.to_builtins(spec.health.check)
        health = " ".join(f"{k}={v}" for k, v in check.items())
    restart = spec.restart
    return [
        f"Command:    {shlex.join(spec.argv)}",
        f"Cwd:        {spec.cwd or '-'}",
        f"Env:        {' '.join(f'{k}={v}' for k, v in sorted(spec.env.items())) or '-'}",
        f"Restart:    {restart.policy.value}"
        f" (at most {restart.max_restarts} restarts in {restart.window:g}s)",
        f"Health:     {health}",
        f"Limits:     {' '.join(f'{k}={v}' for k, v in shown.items()) or '-'}",
        f"Labels:     {' '.join(f'{k}={v}' for k, v in sorted(spec.labels.items())) or '-'}",
        f"Handles:    {' '.join(spec.capabilities) or '-'}",
    ]


def _readable(inspection: Inspection) -> str:
    lines: list[str] = []
    record = inspection.deployment
    if record is not None:
        lines.append(
            f"Deployment: {record.name}" + ("  (being deleted)" if record.deleting else "")
        )
        lines.append(
            f"Replicas:   {record.deployment.replicas}  (generation {record.generation},"
            f" created by {record.created_by or '?'})"
        )
        lines += _spec_lines(record.deployment.spec)
        lines.append("Placement:")
        for p in record.replicas:
            where = p.node_id or f"nowhere ({p.reason or 'waiting'})"
            flags = " failed" if p.failed else (" escalated" if p.escalated else "")
            lines.append(f"  {p.agent_id:<20} {where}  epoch {p.epoch}{flags}")
        if not record.replicas:
            lines.append("  (not placed yet)")
    for status in inspection.agents:
        lines.append("")
        lines.append(f"Agent {status.agent_id} on {status.node_id} (epoch {status.epoch})")
        pid = f"pid {status.pid}" if status.pid else "no process"
        lines.append(
            f"  State:     {status.state.value} since {_when(status.since)} ({pid},"
            f" {status.restarts} restarts, health {status.health.value})"
        )
        lines.append(f"  Last exit: {_last_exit(status)}")
        if status.message:
            lines.append(f"  Message:   {status.message}")
        lines.append("  History:")
        for t in status.history:
            was = t.from_state.value if t.from_state else "-"
            lines.append(f"    {_when(t.at)}  {was:>8} -> {t.to_state.value:<8}  {t.reason}")
    return "\n".join(lines) + "\n"


def _last_exit(status: AgentStatus) -> str:
    if status.exit_code is not None or status.exit_signal:
        return _exit_text(status)
    for t in reversed(status.history):
        if t.to_state in (AgentState.EXITED, AgentState.BACKOFF, AgentState.FAILED):
            return f"{t.to_state.value} at {_when(t.at)}: {t.reason}"
    return "-"
