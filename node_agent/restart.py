"""Turn an agent's exit into a decision: restart after a delay, give up, or stay down.

The policy is data (``schemas.agent.RestartPolicy``); this tracker owns the
only state needed to apply it: the times of recent restarts (the sliding
intensity window) and the backoff exponent. It is pure: the caller passes the
clock value and the random source, so every decision is reproducible.

Rules, in order:

1. A manual stop is never undone, whatever the policy.
2. ``never`` keeps the agent down.
3. ``on-failure`` keeps it down after a clean exit (code 0, no signal) that
   was not a failed start. An exit whose status is unknown (a re-adopted
   process that died while the node agent was away) counts as a failure.
4. A run the supervisor ended itself (memory watchdog, unhealthy verdict)
   is restarted whatever the kind: the spec asked for that restart.
5. ``always`` and ``unless-stopped`` restart after any exit. They differ in
   Docker only by what a daemon restart does to a manually stopped
   container; here a manual stop is never undone (rule 1, and the stop flag
   is stored durably), so the two behave the same.
6. Intensity: with ``max_restarts = N >= 0``, at most N restarts within the
   last ``window`` seconds; the next one gives up and escalates. ``-1``
   retries forever (with backoff). A failed start counts like any restart.
7. Backoff before restart number n (0-based) is
   ``min(max, initial * multiplier**n)`` spread by ``± jitter`` of itself.
   The exponent goes back to 0 once a run lasted at least ``stable_after``
   (``backoff.max``, at least 1 s): a run longer than the longest delay we
   would impose shows the last restart worked.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from schemas.agent import RestartPolicy, RestartPolicyKind

__all__ = ["Decision", "ExitReport", "GiveUp", "Restart", "RestartTracker", "StayDown"]


@dataclass(frozen=True, slots=True)
class ExitReport:
    """What the supervisor knows about one end of a run.

    ``code`` and ``signal`` are both None when the status is unknown.
    ``ran_for`` is how long the process lived (seconds).
    """

    code: int | None = None
    signal: str | None = None
    manual_stop: bool = False
    failed_start: bool = False
    ran_for: float = 0.0
    cause: str | None = None  # set when the supervisor itself ended the run: "unhealthy", ...

    @property
    def clean(self) -> bool:
        return self.code == 0 and self.signal is None and not self.failed_start

    def describe(self) -> str:
        if self.cause:
            what = self.cause
        elif self.signal:
            what = f"killed by {self.signal}"
        elif self.code is not None:
            what = f"exited with code {self.code}"
        else:
            what = "exited (status unknown)"
        return f"failed start: {what}" if self.failed_start else what


@dataclass(frozen=True, slots=True)
class Restart:
    delay: float
    reason: str
    attempt: int  # 0-based backoff exponent used for this delay


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str
    escalate: bool


@dataclass(frozen=True, slots=True)
class StayDown:
    reason: str


Decision = Restart | GiveUp | StayDown


class RestartTracker:
    """Applies one agent's RestartPolicy to its exits."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng if rng is not None else random.Random()
        self._recent: deque[float] = deque()
        self.attempt = 0  # backoff exponent for the next restart
        self.restarts = 0  # total restarts decided, for status

    @property
    def stable_after(self) -> float:
        return max(self.policy.backoff.max, 1.0)

    def delay(self, attempt: int) -> float:
        b = self.policy.backoff
        try:
            base = min(b.max, b.initial * b.multiplier**attempt)
        except OverflowError:  # retry-forever agents reach huge exponents
            base = b.max
        if b.jitter == 0.0 or base == 0.0:
            return base
        return max(0.0, base * (1.0 + b.jitter * self._rng.uniform(-1.0, 1.0)))

    def decide(self, exit: ExitReport, now: float) -> Decision:
        p = self.policy
        what = exit.describe()
        if exit.manual_stop:
            return StayDown(f"{what}; stopped by request")
        # A run the supervisor ended on purpose (watchdog, unhealthy) is a
        # restart the spec asked for; only the budget below may refuse it.
        if exit.cause is None:
            if p.policy == RestartPolicyKind.NEVER:
                return StayDown(f"{what}; restart policy never")
            if p.policy == RestartPolicyKind.ON_FAILURE and exit.clean:
                return StayDown(f"{what}; restart policy on-failure")
        if exit.ran_for >= self.stable_after and not exit.failed_start:
            self.attempt = 0
        while self._recent and self._recent[0] <= now - p.window:
            self._recent.popleft()
        if p.max_restarts >= 0 and len(self._recent) >= p.max_restarts:
            return GiveUp(
                f"{what}; restart limit reached ({p.max_restarts} in {p.window:g} s)",
                escalate=True,
            )
        self._recent.append(now)
        attempt = self.attempt
        self.attempt += 1
        self.restarts += 1
        wait = self.delay(attempt)
        return Restart(wait, f"{what}; restarting in {wait:.3g} s", attempt)

    def reset(self) -> None:
        """Forget the budget and exponent: an operator's explicit start or restart."""
        self._recent.clear()
        self.attempt = 0
