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

Replay: one token admits one task id. Redeliveries of that task (retries, a
controller that died, a waiting task coming back) show the same token for
the same id and pass; the same token on another task id is refused. The
binding is remembered per controller (bounded, oldest forgotten first), so
it narrows replay rather than closing it fleet-wide; the subjects a task may
be published on (operators and controllers only) are the first wall.

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
_MAX_SUBMITTER = 256  # TaskRecord.submitted_by is ShortText
# The attribute a controller's admission rides on, on the dispatcher it runs
# (fabric.tasks.dispatch is owned apart; the call site there is one line).
_ATTR = "admission"


class _AtVerifier(TokenVerifier):
    """A verifier whose clock is the task's stored time, set before each check.

    Its jti replay cache is off: a task's token is shown again on every
    redelivery of that task, which is no replay; :class:`Admission` binds each
    jti to one task id instead.
    """

    def __init__(self, keys: Sequence[Ed25519PublicKey], leeway: float) -> None:
        self.at = 0.0
        super().__init__(keys, leeway=leeway, clock=lambda: self.at)

    def _record(self, claims: Claims, now: float) -> None:
        return None


class Admission:
    """The controller's admission policy for tasks; :meth:`check` is pure but for its
    bounded memory of which token admitted which task."""

    def __init__(
        self,
        keys: Sequence[Ed25519PublicKey],
        *,
        require_token: bool = True,
        leeway: float = DEFAULT_LEEWAY,
        on_refused: Callable[[Refusal], None] | None = None,
        remember: int = _REMEMBER,
    ) -> None:
        self.require_token = require_token
        self.on_refused = on_refused
        self._verifier = _AtVerifier(keys, leeway)
        self._bound: OrderedDict[str, str] = OrderedDict()
        self._remember = remember

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
        if task.token is None:
            if self.require_token:
                raise ContractError(
                    ErrorCode.TOKEN_MISSING, "a task needs a token with scope tasks:submit"
                )
            return task
        self._verifier.at = stored_at
        claims = self._verifier.verify(task.token, scope=SUBMIT_SCOPE)
        missing = [scope for scope in scopes_for(task.type) if scope not in claims.scopes]
        if missing:
            # An exec task starts a command on a node: it needs what `fabric
            # run` needs, not only the right to queue work for agents.
            raise ContractError(
                ErrorCode.TOKEN_SCOPE,
                f"a {task.type!r} task needs a token granting {', '.join(missing)} as well",
            )
        bound = self._bound.get(claims.jti)
        if bound is not None and bound != task.id:
            raise ContractError(
                ErrorCode.TOKEN_REPLAYED, f"this token already submitted task {bound!r}"
            )
        if bound is None:
            self._bound[claims.jti] = task.id
            if len(self._bound) > self._remember:
                self._bound.popitem(last=False)
        return msgspec.structs.replace(task, submitted_by=claims.sub[:_MAX_SUBMITTER], token=None)


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
