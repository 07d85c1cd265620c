"""`fabric task submit|get|ls|dead`: put work on the queue and read what became of it.

``fabric task submit TYPE [--data JSON|@file] [--id ID] [--priority N]
[--max-attempts N] [--wait] [--timeout S] [--json]`` stores a task in
JetStream and prints its id once the server has acknowledged it. The same
``--id`` twice is stored once (and said so). With ``--wait`` it follows the
task's record to the end and prints the result; the exit code is 0 when
the task succeeded, 1 when it died (its last error is printed).

Each submission carries a fresh token (scope ``tasks:submit``) minted from
the operator key, like every CLI call; the controller takes the submitter
from it and refuses the task (record state ``refused``, with the code) when
the token is bad.

``fabric task get ID [--json]`` prints the task's record.

``fabric task ls [--type T] [--state S] [--pending] [--limit N] [--json]``
lists task records, oldest first (``--limit`` keeps the newest N);
``--pending`` shows the tasks waiting to run and why (no running agent
serves the type, every capable agent busy, a retry after a failure).

``fabric task dead ls [--type T] [--all] [--json]`` lists the dead letters
(tasks that spent their attempts, with their last error); ``--all`` also
shows those already retried. ``fabric task dead retry ID`` submits a dead
task again under its own id with a new attempt budget: its record goes back
to ``queued`` and counts the retry; the letter is kept (marked retried in
the listing) until the stream's age limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from fabric.cli import CommandFailed, UsageError
from fabric.cli.output import age, human_duration, print_json, print_table
from fabric.client import FabricClient, FabricError, add_client_options, run_cli
from fabric.tasks.admission import SUBMIT_SCOPE, scopes_for
from fabric.tasks.backlog import queue_backlog
from fabric.tasks.client import DeadLetter, TaskClient
from fabric.tasks.records import TaskRecord, TaskState
from schemas.errors import ContractError, ErrorCode
from schemas.task import EXEC_TASK_TYPE

__all__ = ["register"]

_INPUT_CODES = frozenset({ErrorCode.INVALID_ID, ErrorCode.INVALID_PAYLOAD})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    task = subparsers.add_parser(
        "task",
        help="submit, list and retry tasks",
        description=(
            "Submit tasks to the queue (each with a fresh submit token), read their"
            " records, list the pending and the dead ones, retry a dead one."
        ),
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

    ls = verbs.add_parser(
        "ls",
        help="list task records",
        description="List task records, oldest first; --pending: waiting ones and why.",
    )
    ls.add_argument("--type", metavar="T", help="only tasks of type T")
    ls.add_argument(
        "--state", metavar="S", choices=[s.value for s in TaskState], help="only tasks in state S"
    )
    ls.add_argument(
        "--pending", action="store_true", help="tasks waiting to run, with the reason they wait"
    )
    ls.add_argument("--limit", type=int, metavar="N", help="the newest N only")
    ls.add_argument("--json", action="store_true", help="TaskRecord objects, as in the contract")
    add_client_options(ls)
    ls.set_defaults(handler=_ls)

    dead = verbs.add_parser(
        "dead",
        help="dead letters: list and retry",
        description="Tasks that spent their attempts (stream TASKS_DEAD).",
    )
    dead_verbs = dead.add_subparsers(dest="dead_verb", metavar="VERB")
    dead_verbs.required = True
    dead_ls = dead_verbs.add_parser(
        "ls", help="list dead letters", description="List dead letters, oldest first."
    )
    dead_ls.add_argument("--type", metavar="T", help="only tasks of type T")
    dead_ls.add_argument("--all", action="store_true", help="also those already retried")
    dead_ls.add_argument(
        "--json", action="store_true", help="DeadTask objects (plus sequence, state)"
    )
    add_client_options(dead_ls)
    dead_ls.set_defaults(handler=_dead_ls)
    retry = dead_verbs.add_parser(
        "retry",
        help="run a dead task again",
        description="Submit a dead task again under its own id, with a new attempt budget.",
    )
    retry.add_argument("id", metavar="ID")
    retry.add_argument("--wait", action="store_true", help="follow the task to its result")
    retry.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds"
    )
    retry.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(retry)
    retry.set_defaults(handler=_retry)


def task_client(client: FabricClient, scopes: Sequence[str] = (SUBMIT_SCOPE,)) -> TaskClient:
    """A task client whose submissions carry a fresh token with ``scopes`` each
    (when the settings name a token key; without one, the controller decides)."""
    mint = None
    if client.env.token_key is not None:

        def mint() -> str:
            return client.mint(list(scopes))

    return TaskClient(client.nc, submitted_by=client.subject, token=mint)


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
    tasks = task_client(client, scopes_for(args.type))
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
    elif record.state is TaskState.REFUSED:
        code = record.code.value if record.code else "refused"
        print(f"task {record.id} was refused ({code}): {record.error}", file=sys.stderr)
    else:
        print(
            f"task {record.id} is dead after {record.attempts} attempt(s): {record.error}",
            file=sys.stderr,
        )
    return 0 if record.state is TaskState.SUCCEEDED else 1


def _get(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _get_async(client, args))


async def _get_async(client: FabricClient, args: argparse.Namespace) -> int:
    tasks = task_client(client)
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
        f"Attempts:    {record.attempts} of {record.max_attempts}"
        + (f" (retried {record.retries}x)" if record.retries else ""),
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
        code = f"{record.code.value}: " if record.code else ""
        lines.append(f"Error:       {code}{record.error}")
    if record.state is TaskState.SUCCEEDED:
        lines.append(f"Result:      {json.dumps(record.result, sort_keys=True)}")
    return "\n".join(lines)


# --- ls and dead letters ----------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be 1 or more")
    return run_cli(args, lambda client: _ls_async(client, args))


async def _ls_async(client: FabricClient, args: argparse.Namespace) -> int:
    tasks = task_client(client)
    try:
        records = await tasks.list_records(
            task_type=args.type,
            state=TaskState(args.state) if args.state else None,
            pending=args.pending,
            limit=args.limit,
        )
    except ContractError as exc:
        raise _refused(exc) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise _unreadable("task records", exc) from None
    if args.json:
        print_json(records)
        return 0
    now = datetime.now(UTC)
    headers = ["ID", "TYPE", "STATE", "ATTEMPTS", "AGENT", "AGE", "BY"]
    if args.pending:
        headers.append("WAITING")
    rows = []
    for r in records:
        row = [
            r.id,
            r.type,
            r.state.value,
            f"{r.attempts}/{r.max_attempts}",
            r.agent_id or "-",
            human_duration(age(r.submitted_at or r.updated_at, now)),
            r.submitted_by or "-",
        ]
        if args.pending:
            row.append(pending_reason(r))
        rows.append(row)
    print_table(headers, rows, styles=(2,))
    if args.pending:
        await _untaken(tasks, args.type)
    return 0


async def _untaken(tasks: TaskClient, task_type: str | None) -> None:
    """Say so when the queue holds tasks no controller has taken (they have no record,
    so no listing of records shows them): usually no controller is running."""
    stored = await queue_backlog(tasks.js)
    if not stored:
        return
    live = await tasks.list_records(task_type=task_type)
    taken = Counter(r.type for r in live if not r.final)
    untaken = sum(
        max(0, n - taken[t]) for t, n in stored.items() if task_type is None or t == task_type
    )
    if untaken:
        print(
            f"and {untaken} task(s) in the queue no controller has taken yet"
            " (no record; is a controller running?)",
            file=sys.stderr,
        )


def _unreadable(what: str, exc: BaseException) -> CommandFailed:
    # A viewer identity has no JetStream access beyond the event stream.
    return CommandFailed(
        f"cannot read the {what} ({exc or type(exc).__name__}): this needs an operator identity"
    )


def pending_reason(record: TaskRecord) -> str:
    """Why a task that is neither running nor finished waits."""
    if record.waiting:
        return record.waiting
    if record.state is TaskState.FAILED:
        return f"retry after failed attempt {record.attempts}: {record.error or 'failed'}"
    return "in the queue, not taken by a controller yet"


def _dead_ls(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _dead_ls_async(client, args))


async def _dead_ls_async(client: FabricClient, args: argparse.Namespace) -> int:
    tasks = task_client(client)
    try:
        letters = await tasks.dead(args.type)
    except ContractError as exc:
        raise _refused(exc) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise _unreadable("dead letters", exc) from None
    shown = [d for d in letters if args.all or not d.retried]
    if args.json:
        print_json([_letter_json(d) for d in shown])
        return 0
    now = datetime.now(UTC)
    rows = [
        [
            d.task.id,
            d.task.type,
            d.record.state.value if d.record else "dead",
            str(d.letter.attempts),
            human_duration(age(d.letter.dead_at, now)),
            # The record has the latest error: a retry that died again within the
            # dead stream's duplicate window left no second letter.
            _clip((d.record.error if d.record and d.record.error else None) or d.letter.error, 60),
        ]
        for d in shown
    ]
    print_table(("ID", "TYPE", "STATE", "ATTEMPTS", "DIED", "ERROR"), rows, styles=(2,))
    return 0


def _letter_json(d: DeadLetter) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(d.letter)
    out["sequence"] = d.sequence
    out["state"] = d.record.state.value if d.record else TaskState.DEAD.value
    out["retries"] = d.record.retries if d.record else 0
    return out


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _retry(args: argparse.Namespace) -> int:
    return run_cli(args, lambda client: _retry_async(client, args))


async def _retry_async(client: FabricClient, args: argparse.Namespace) -> int:
    # The dead task's type is read by the retry itself: its token must do for any.
    tasks = task_client(client, scopes_for(EXEC_TASK_TYPE))
    try:
        submitted = await tasks.retry(args.id)
    except ContractError as exc:
        if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_STATE):
            raise FabricError(exc.code, exc.message) from None
        raise _refused(exc) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise CommandFailed(f"task not stored: {exc or type(exc).__name__}") from None
    task = submitted.task
    if not args.json:
        if submitted.duplicate:
            print(f"retry {task.retry} of task {task.id} was already submitted: it runs once")
        else:
            print(f"retried {task.id} ({task.type}, retry {task.retry})")
        sys.stdout.flush()
    if not args.wait:
        if args.json:
            _print_json({"id": task.id, "retry": task.retry, "duplicate": submitted.duplicate})
        return 0
    # The record is dead until a controller admits the retry: wait for the new run's end.
    try:
        record = await tasks.wait(task.id, within=args.timeout, retry=task.retry)
    except ContractError as exc:
        raise FabricError(exc.code, exc.message) from None
    return _show_final(record, args.json)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
    sys.stdout.flush()
