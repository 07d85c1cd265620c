"""`fabric task submit|get`: put work on the queue and read what became of it.

``fabric task submit TYPE [--data JSON|@file] [--id ID] [--priority N]
[--max-attempts N] [--wait] [--timeout S] [--json]`` stores a task in
JetStream and prints its id once the server has acknowledged it. The same
``--id`` twice is stored once (and said so). With ``--wait`` it follows the
task's record to the end and prints the result; the exit code is 0 when
the task succeeded, 1 when it died (its last error is printed).

``fabric task get ID [--json]`` prints the task's record.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from fabric.cli import CommandFailed, UsageError
from fabric.client import FabricClient, FabricError, add_client_options, run_cli
from fabric.tasks.client import TaskClient
from fabric.tasks.records import TaskRecord, TaskState
from schemas.errors import ContractError, ErrorCode

__all__ = ["register"]

_INPUT_CODES = frozenset({ErrorCode.INVALID_ID, ErrorCode.INVALID_PAYLOAD})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    task = subparsers.add_parser(
        "task",
        help="submit tasks and read their results",
        description="Submit tasks to the queue and read their records.",
    )
    verbs = task.add_subparsers(dest="task_verb", metavar="VERB")
    verbs.required = True

    submit = verbs.add_parser(
        "submit",
        help="store a task in the queue",
        description="Store a task in the queue; printed once JetStream has it.",
    )
    submit.add_argument("type", metavar="TYPE", help="task type, e.g. summarize")
    submit.add_argument(
        "--data", metavar="JSON|@FILE", help="the payload: JSON text, or @path to a JSON file"
    )
    submit.add_argument("--id", metavar="ID", help="task id (default: a random one)")
    submit.add_argument("--priority", type=int, default=5, metavar="N", help="0 to 9 (default 5)")
    submit.add_argument(
        "--max-attempts", type=int, default=3, metavar="N", help="attempts before the dead letter"
    )
    submit.add_argument("--wait", action="store_true", help="follow the task to its result")
    submit.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds"
    )
    submit.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(submit)
    submit.set_defaults(handler=_submit)

    get = verbs.add_parser("get", help="show a task's record", description="Show a task's record.")
    get.add_argument("id", metavar="ID")
    get.add_argument("--json", action="store_true", help="print the record as JSON")
    add_client_options(get)
    get.set_defaults(handler=_get)


def read_data(text: str | None) -> Any:
    """``--data``: JSON text, ``@file`` (JSON), or None."""
    if text is None:
        return None
    source = "--data"
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        source = str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not JSON: {exc}") from None


def _refused(exc: ContractError) -> Exception:
    if exc.code in _INPUT_CODES or exc.code is ErrorCode.PAYLOAD_TOO_LARGE:
        return UsageError(str(exc))
    return FabricError(exc.code, exc.message)


def _submit(args: argparse.Namespace) -> int:
    payload = read_data(args.data)
    return run_cli(args, lambda client: _submit_async(client, args, payload))


async def _submit_async(client: FabricClient, args: argparse.Namespace, payload: Any) -> int:
    tasks = TaskClient(client.nc, submitted_by=client.subject)
    try:
        submitted = await tasks.submit(
            args.type,
            payload,
            task_id=args.id,
            priority=args.priority,
            max_attempts=args.max_attempts,
        )
    except ContractError as exc:
        raise _refused(exc) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise CommandFailed(f"task not stored: {exc or type(exc).__name__}") from None
    task_id = submitted.task.id
    if not args.json:
        if submitted.duplicate:
            print(f"task {task_id} was already submitted: stored once, it runs once")
        else:
            print(f"submitted {task_id} ({args.type}, queue position {submitted.sequence})")
        sys.stdout.flush()
    if not args.wait:
        if args.json:
            _print_json({"id": task_id, "duplicate": submitted.duplicate})
        return 0
    try:
        record = await tasks.wait(task_id, within=args.timeout)
    except ContractError as exc:
        raise FabricError(exc.code, exc.message) from None
    return _show_final(record, args.json)


def _show_final(record: TaskRecord, as_json: bool) -> int:
    if as_json:
        _print_json(msgspec.to_builtins(record))
    elif record.state is TaskState.SUCCEEDED:
        print(json.dumps(record.result, indent=2, sort_keys=True))
    else:
        print(
            f"task {record.id} is dead after {record.attempts} attempt(s): {record.error}",
            file=sys.stderr,
        )
    return 0 if record.state is TaskState.SUCCEEDED else 1


def _get(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _get_async(client, args))


async def _get_async(client: FabricClient, args: argparse.Namespace) -> int:
    tasks = TaskClient(client.nc, submitted_by=client.subject)
    try:
        record = await tasks.get(args.id)
    except ContractError as exc:
        raise _refused(exc) from None
    if record is None:
        raise FabricError(
            ErrorCode.NOT_FOUND, f"no record of task {args.id!r} (unknown, or not dispatched yet)"
        )
    if args.json:
        _print_json(msgspec.to_builtins(record))
    else:
        print(describe(record))
    return 0


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def describe(record: TaskRecord) -> str:
    lines = [
        f"Task:        {record.id}",
        f"Type:        {record.type}",
        f"State:       {record.state.value}",
        f"Attempts:    {record.attempts} of {record.max_attempts}",
        f"Submitted:   {_when(record.submitted_at)} by {record.submitted_by or '-'}",
        f"Agent:       {record.agent_id or '-'} on {record.node_id or '-'}",
        f"Started:     {_when(record.started_at)}",
        f"Finished:    {_when(record.finished_at)}",
    ]
    if record.progress is not None or record.progress_message:
        shown = "-" if record.progress is None else f"{record.progress:.0%}"
        lines.append(f"Progress:    {shown} {record.progress_message}".rstrip())
    if record.waiting:
        lines.append(f"Waiting:     {record.waiting}")
    if record.error:
        lines.append(f"Error:       {record.error}")
    if record.state is TaskState.SUCCEEDED:
        lines.append(f"Result:      {json.dumps(record.result, sort_keys=True)}")
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
    sys.stdout.flush()
