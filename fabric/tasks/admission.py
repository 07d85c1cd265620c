"""Admission: what a controller checks before a submitted task may run.

A task carries a short-lived token (``Task.token``, scope ``tasks:submit``)
minted by its submitter from the operator key, as every CLI call does. The
dispatcher calls :func:`admit` right after decoding a task; it returns the
task to run, with ``submitted_by`` set to the token's verified subject and
the token removed (a worker never sees it, a dead letter never stores it),
or None when the task was refused. A refused task:

* gets a final ``refused`` record with the refusal's code (only when no
  record of that id exists: a bad message never overwrites a real task's),
* is counted and audited through the controller's ``on_refused`` hook
  (``fabric_refused_messages_total{code}``, ``events.controller.refused``),
* has its message termed: it never runs and is never redelivered.

Codes, in the verifier's order (:mod:`fabric.tokens`): ``token_missing``
(none, while the controller requires one), ``token_invalid``,
``token_expired``, ``token_not_yet_valid``, ``token_wrong_audience``,
``token_scope`` (no ``tasks:submit``; an ``exec`` task also needs
``agents:run``, as ``fabric run`` does), ``token_wrong_target`` (a token bound
to one agent or node), ``token_replayed`` (the token already admitted
another task); a retry of a task that is not dead: ``invalid_state``.

Time: a token is checked as of the moment JetStream stored the task (the
message's server timestamp), not the moment a dispatcher takes it. A task may
wait in the queue far longer than a token lives (no capable agent yet, a
backlog); what matters is that its submitter was entitled when it was
submitted. A token stored after it expired is refused, however fast it is
taken.

Replay: a token admits at most ``max_tasks`` distinct task ids (its claim,
1 when absent; :class:`~fabric.tasks.client.TaskClient` mints one for up to
1,000 tasks). Redeliveries of an admitted task (retries, a controller that
died, a waiting task coming back) show the same token for the same id and
pass; the token on one id more is refused. The binding is remembered per
controller (at most ``remember`` task ids in all, the token that admitted
least recently forgotten first), so it narrows replay rather than closing it
fleet-wide; the subjects a task may be published on (operators and
controllers only) are the first wall.

Cost: a controller verifies a token's signature once while it keeps it: the
verified claims are kept by the exact token string (the 4,096 tokens shown
most recently); a task showing a kept token only runs the checks that depend
on the task (time as of its stored time, scopes for its type, target). A
token that fails verification is not kept: it is verified, and refused, each
time it is shown.

Policy: a controller may run with ``require_token=False`` (library default,
what tests and benchmarks built on a bare dispatcher use): a task without a
token is then admitted on its submitter's word. A token that is present is
always checked. ``fabric controller run`` (and so ``fabric up``) requires
tokens unless given ``--allow-untokened-tasks``.

A retry (``Task.retry`` = n > 0, sent by ``fabric task dead retry``) is also
admitted here: the task's ``dead`` record is reset to ``queued`` with a new
attempt budget and ``retries = n`` before the dispatcher looks at it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.msg import Msg

from fabric.audit import Refusal
from fabric.tasks.records import RecordStore, TaskState, encode_record, refused, revived
from fabric.tokens import DEFAULT_LEEWAY, Claims, TokenVerifier
from schemas.errors import ContractError, ErrorCode
from schemas.task import EXEC_TASK_TYPE, Task

__all__ = ["RUN_SCOPE", "SUBMIT_SCOPE", "Admission", "admit", "attach", "attached", "scopes_for"]

log = logging.getLogger(__name__)

SUBMIT_SCOPE = "tasks:submit"
RUN_SCOPE = "agents:run"
_REMEMBER = 100_000
# A few hundred bytes each: about 2 MB at most, and far more tokens than
# clients submitting at once.
_VERIFIED_TOKENS = 4096
_MAX_SUBMITTER = 256  # TaskRecord.submitted_by is ShortText
# The attribute a controller's admission rides on, on the dispatcher it runs
# (fabric.tasks.dispatch is owned apart; the call site there is one line).
_ATTR = "admission"


class _Bindings:
    """Which task ids each token (by jti) admitted, at most ``capacity`` ids in all.

    Tokens are kept least recently admitting first, so a client that keeps
    submitting with one token keeps its count; with ``capacity`` at or above
    :data:`~fabric.tokens.MAX_TASKS_PER_TOKEN` the token admitting now is
    never the one forgotten.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("remember must be at least 1")
        self._capacity = capacity
        # dict, not set: the first id admitted is named in the refusal.
        self._ids: OrderedDict[str, dict[str, None]] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        """Task ids remembered, over all tokens."""
        return self._total

    def admit(self, jti: str, task_id: str, limit: int) -> None:
        """Bind ``task_id`` to ``jti`` unless the token already admitted ``limit`` others:
        ContractError(TOKEN_REPLAYED) then, and nothing is recorded."""
        ids = self._ids.get(jti)
        if ids is None:
            ids = self._ids[jti] = {}
        else:
            self._ids.move_to_end(jti)
            if task_id in ids:
                return
            if len(ids) >= limit:
                first = next(iter(ids))
                if limit == 1:
                    raise ContractError(
                        ErrorCode.TOKEN_REPLAYED, f"this token already submitted task {first!r}"
                    )
                raise ContractError(
                    ErrorCode.TOKEN_REPLAYED,
                    f"this token already submitted its {limit} tasks (the first {first!r})",
                )
        ids[task_id] = None
        self._total += 1
        while self._total > self._capacity:
            _, dropped = self._ids.popitem(last=False)
            self._total -= len(dropped)


class Admission:
    """The controller's admission policy for tasks; :meth:`check` is pure but for its
    bounded memory of verified tokens and of which token admitted which tasks."""

    def __init__(
        self,
        keys: Sequence[Ed25519PublicKey],
        *,
        require_token: bool = True,
        leeway: float = DEFAULT_LEEWAY,
        on_refused: Callable[[Refusal], None] | None = None,
        remember: int = _REMEMBER,
        verified_tokens: int = _VERIFIED_TOKENS,
    ) -> None:
        if verified_tokens < 1:
            raise ValueError("verified_tokens must be at least 1")
        self.require_token = require_token
        self.on_refused = on_refused
        # Used for decode and check only: its own jti replay cache stays empty,
        # since a redelivered task shows its token again and that is no replay.
        self._verifier = TokenVerifier(keys, leeway=leeway)
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        self._verified_max = verified_tokens
        self._bindings = _Bindings(remember)

    @property
    def remembered(self) -> tuple[int, int]:
        """(tokens whose signature is kept verified, task ids bound to tokens)."""
        return len(self._verified), len(self._bindings)

    @classmethod
    def from_files(cls, *paths: Path, **kw: Any) -> Admission:
        """PEM Ed25519 public keys, as the controller's own verifier reads them;
        ValueError for anything else, OSError when a file cannot be read."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(Path(path).read_bytes())
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ValueError(f"{path}: not a PEM public key ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"{path}: not an Ed25519 public key")
            keys.append(key)
        return cls(keys, **kw)

    def check(self, task: Task, stored_at: float) -> Task:
        """The task as it may run, or ContractError with the refusal's code.

        ``stored_at``: unix time at which JetStream stored the task.
        """
        token = task.token
        if token is None:
            if self.require_token:
                raise ContractError(
                    ErrorCode.TOKEN_MISSING, "a task needs a token with scope tasks:submit"
                )
            return task
        if not token:
            raise ContractError(ErrorCode.TOKEN_MISSING, "a token is required")
        claims = self._claims(token)
        self._verifier.check(claims, stored_at, scope=SUBMIT_SCOPE)
        missing = [scope for scope in scopes_for(task.type) if scope not in claims.scopes]
        if missing:
            # An exec task starts a command on a node: it needs what `fabric
            # run` needs, not only the right to queue work for agents.
            raise ContractError(
                ErrorCode.TOKEN_SCOPE,
                f"a {task.type!r} task needs a token granting {', '.join(missing)} as well",
            )
        self._bindings.admit(claims.jti, task.id, claims.max_tasks)
        return msgspec.structs.replace(task, submitted_by=claims.sub[:_MAX_SUBMITTER], token=None)

    def _claims(self, token: str) -> Claims:
        """The token's verified claims: its signature checked on first sight only."""
        claims = self._verified.get(token)
        if claims is not None:
            self._verified.move_to_end(token)
            return claims
        # Raises for a bad token before anything is kept.
        claims = self._verifier.decode(token)
        self._verified[token] = claims
        if len(self._verified) > self._verified_max:
            self._verified.popitem(last=False)
        return claims


def scopes_for(task_type: str) -> tuple[str, ...]:
    """The scopes a submit token needs for a task of ``task_type``."""
    if task_type == EXEC_TASK_TYPE:
        return (SUBMIT_SCOPE, RUN_SCOPE)
    return (SUBMIT_SCOPE,)


def attach(dispatcher: Any, admission: Admission) -> None:
    """Give ``dispatcher`` the admission policy :func:`admit` applies."""
    setattr(dispatcher, _ATTR, admission)


def attached(dispatcher: Any) -> Admission | None:
    found = getattr(dispatcher, _ATTR, None)
    return found if isinstance(found, Admission) else None


def _stored_at(msg: Msg) -> float:
    stamp: Any = msg.metadata.timestamp
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return float(stamp) / 1e9 if stamp else 0.0


async def admit(dispatcher: Any, msg: Msg, task: Task) -> Task | None:
    """The task to run (its submitter verified), or None: refused, recorded, termed.

    ``dispatcher``: a :class:`~fabric.tasks.dispatch.Dispatcher` (its ``store``,
    ``name``, ``counts``). Without an attached :class:`Admission` every task is
    admitted as it came, but its token is still dropped before it runs.
    """
    admission = attached(dispatcher)
    store: RecordStore | None = dispatcher.store
    try:
        if admission is None:
            admitted = msgspec.structs.replace(task, token=None) if task.token else task
        else:
            admitted = admission.check(task, _stored_at(msg))
        if admitted.retry and store is not None:
            await _revive(store, admitted, dispatcher.name)
    except ContractError as exc:
        await _refuse(dispatcher, admission, msg, task, exc)
        return None
    return admitted


async def _revive(store: RecordStore, task: Task, dispatcher: str) -> None:
    """Reset a dead task's record for the operator's retry number ``task.retry``."""
    for _ in range(5):
        found = await store.get(task.id)
        if found is None:
            # The record expired (records outlive nothing; dead letters last longer).
            await store.claim(task, dispatcher, first=lambda r: _retried(r, task.retry))
            return
        record = found.record
        if record.retries >= task.retry:
            return  # this retry was admitted already: a redelivery of it
        if record.state is not TaskState.DEAD:
            raise ContractError(
                ErrorCode.INVALID_STATE,
                f"task {task.id!r} is {record.state.value}, not dead: only a dead task is retried",
            )
        fresh = msgspec.structs.replace(revived(record, task), dispatcher=dispatcher)
        try:
            await store.kv.update(task.id, encode_record(fresh), last=found.revision)
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # written meanwhile (another controller took the same retry): look again
    raise ContractError(ErrorCode.CONFLICT, f"task record {task.id!r} keeps changing")


def _retried(record: Any, retry: int) -> Any:
    return msgspec.structs.replace(record, retries=retry)


async def _refuse(
    dispatcher: Any, admission: Admission | None, msg: Msg, task: Task, exc: ContractError
) -> None:
    log.warning("task %s refused: %s", task.id, exc)
    dispatcher.counts["refused"] += 1
    if admission is not None and admission.on_refused is not None:
        refusal = Refusal.of(exc.code, msg.subject, msg.data, op="submit", target=task.id)
        admission.on_refused(refusal)
    store: RecordStore | None = dispatcher.store
    if store is not None:
        # Nobody verified is named: the task's own submitted_by is only a claim.
        anonymous = msgspec.structs.replace(task, submitted_by="", token=None)
        code, text = exc.code, exc.message

        def refuse(record: Any) -> Any:
            return refused(record, code, text)

        # Created only if absent: a refused message must not touch a real task's record.
        await store.claim(anonymous, dispatcher.name, first=refuse)
    await msg.term()
