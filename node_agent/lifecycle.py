"""The agent state machine: which moves are allowed, and the record of each move.

::

                      ┌──────────── start / restart ─────────────┐
                      ▼                                          │
    pending ──▶ starting ──(alive after start_seconds)──▶ running ◀──▶ paused
       │          │  ▲                                     │  │         │
       │          │  └──────────── backoff ◀──(exit, policy restarts)───┘
       │          │                  │                     │
       │          │                  └──(budget spent)──▶ failed
       │          ▼                                        ▼
       │      exited (code/signal; policy keeps it down)  stopping ──▶ stopped
       └──(re-adopted)──▶ running

``pending`` may also go straight to ``failed`` (cannot spawn), ``stopped``
(stopped before it ever ran) or, after a node agent restart, back to the
settled state it had (``exited``) or to ``backoff``. ``stopping`` ends in ``stopped`` for a manual
stop, or leads on to ``starting``/``backoff``/``failed`` when the stop was a
restart (manual restart, memory watchdog, unhealthy verdict). Any settled
state (``stopped``, ``exited``, ``failed``) may be started again.

Pure: no I/O, no clock of its own beyond the injected ``clock``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime

from schemas.agent import AgentState, Transition
from schemas.common import utc_now
from schemas.errors import ContractError, ErrorCode

__all__ = ["ALLOWED", "HISTORY_SIZE", "SETTLED", "AgentLifecycle"]

S = AgentState
HISTORY_SIZE = 64
# Transition reasons go on the wire as ShortText (max 256 chars).
_REASON_MAX = 256

ALLOWED: dict[AgentState, frozenset[AgentState]] = {
    S.PENDING: frozenset({S.STARTING, S.RUNNING, S.FAILED, S.STOPPED, S.EXITED, S.BACKOFF}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.BACKOFF, S.FAILED, S.EXITED}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPING, S.BACKOFF, S.FAILED, S.EXITED}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPING, S.BACKOFF, S.FAILED, S.EXITED}),
    S.STOPPING: frozenset({S.STOPPED, S.STARTING, S.BACKOFF, S.FAILED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset({S.STARTING}),
    S.EXITED: frozenset({S.STARTING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

# States in which no process of the agent is expected to exist.
SETTLED: frozenset[AgentState] = frozenset({S.PENDING, S.STOPPED, S.EXITED, S.FAILED, S.BACKOFF})


class AgentLifecycle:
    """Current state of one agent plus a bounded, timestamped history of its moves."""

    def __init__(
        self, *, clock: Callable[[], datetime] = utc_now, reason: str = "accepted"
    ) -> None:
        self._clock = clock
        self.state: AgentState = S.PENDING
        self.since: datetime = clock()
        self.reason: str = reason[:_REASON_MAX]
        self.exit_code: int | None = None
        self.exit_signal: str | None = None
        self.history: deque[Transition] = deque(maxlen=HISTORY_SIZE)
        self.history.append(Transition(None, S.PENDING, self.since, self.reason))

    def can(self, to: AgentState) -> bool:
        return to in ALLOWED[self.state]

    def transition(self, to: AgentState, reason: str) -> Transition:
        """Move to ``to`` or raise ``ContractError(INVALID_STATE)``; returns the record."""
        if to not in ALLOWED[self.state]:
            raise ContractError(
                ErrorCode.INVALID_STATE, f"cannot go from {self.state.value} to {to.value}"
            )
        now = self._clock()
        record = Transition(self.state, to, now, reason[:_REASON_MAX])
        self.state, self.since, self.reason = to, now, record.reason
        if to is S.STARTING:
            # A new run: the previous exit no longer describes the process.
            self.exit_code = self.exit_signal = None
        self.history.append(record)
        return record

    def record_exit(self, code: int | None, signal: str | None) -> None:
        self.exit_code, self.exit_signal = code, signal
