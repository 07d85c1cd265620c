"""RestartTracker: every policy, exact backoff sequences, intensity, stop rules."""

from __future__ import annotations

import random

import pytest

from node_agent.restart import ExitReport, GiveUp, Restart, RestartTracker, StayDown
from schemas.agent import Backoff, RestartPolicy
from schemas.agent import RestartPolicyKind as K

CRASH = ExitReport(code=1)
CLEAN = ExitReport(code=0)
KILLED = ExitReport(signal="SIGKILL")
UNKNOWN = ExitReport()
STOPPED = ExitReport(signal="SIGTERM", manual_stop=True)
EARLY_CLEAN = ExitReport(code=0, failed_start=True)
UNHEALTHY = ExitReport(signal="SIGTERM", cause="unhealthy")


def policy(kind: K, **kw: object) -> RestartPolicy:
    return RestartPolicy(policy=kind, backoff=Backoff(jitter=0.0), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "exit", "expected"),
    [
        (K.NEVER, CRASH, StayDown),
        (K.NEVER, CLEAN, StayDown),
        (K.NEVER, UNKNOWN, StayDown),
        (K.NEVER, UNHEALTHY, Restart),
        (K.ON_FAILURE, CRASH, Restart),
        (K.ON_FAILURE, KILLED, Restart),
        (K.ON_FAILURE, UNKNOWN, Restart),
        (K.ON_FAILURE, CLEAN, StayDown),
        (K.ON_FAILURE, EARLY_CLEAN, Restart),
        (K.ON_FAILURE, UNHEALTHY, Restart),
        (K.ALWAYS, CRASH, Restart),
        (K.ALWAYS, CLEAN, Restart),
        (K.ALWAYS, UNKNOWN, Restart),
        (K.UNLESS_STOPPED, CRASH, Restart),
        (K.UNLESS_STOPPED, CLEAN, Restart),
        (K.UNLESS_STOPPED, UNKNOWN, Restart),
        *[(k, STOPPED, StayDown) for k in K],
    ],
)
def test_policy_table(kind: K, exit: ExitReport, expected: type) -> None:
    decision = RestartTracker(policy(kind)).decide(exit, now=0.0)
    assert type(decision) is expected


def test_manual_stop_never_undone_even_for_supervisor_causes() -> None:
    t = RestartTracker(policy(K.ALWAYS))
    d = t.decide(ExitReport(signal="SIGTERM", manual_stop=True, cause="unhealthy"), 0.0)
    assert isinstance(d, StayDown)
    assert "stopped by request" in d.reason


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (
            Backoff(initial=0.5, max=30.0, multiplier=2.0, jitter=0.0),
            [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0],
        ),
        (Backoff(initial=1.0, max=5.0, multiplier=1.0, jitter=0.0), [1.0] * 8),
        (
            Backoff(initial=0.1, max=1.0, multiplier=3.0, jitter=0.0),
            [0.1, 0.3, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0],
        ),
        (Backoff(initial=0.0, max=0.0, multiplier=2.0, jitter=0.5), [0.0] * 8),
    ],
)
def test_exact_backoff_sequence(backoff: Backoff, expected: list[float]) -> None:
    t = RestartTracker(RestartPolicy(policy=K.ALWAYS, backoff=backoff, max_restarts=-1))
    delays = []
    for i in range(len(expected)):
        d = t.decide(CRASH, now=float(i))
        assert isinstance(d, Restart)
        assert d.attempt == i
        delays.append(d.delay)
    assert delays == pytest.approx(expected)


def test_jitter_stays_within_bounds_and_is_seeded() -> None:
    backoff = Backoff(initial=1.0, max=8.0, multiplier=2.0, jitter=0.25)
    pol = RestartPolicy(policy=K.ALWAYS, backoff=backoff, max_restarts=-1)
    a = RestartTracker(pol, random.Random(7))
    b = RestartTracker(pol, random.Random(7))
    seq_a = [a.decide(CRASH, float(i)) for i in range(10)]
    seq_b = [b.decide(CRASH, float(i)) for i in range(10)]
    assert seq_a == seq_b
    for i, d in enumerate(seq_a):
        assert isinstance(d, Restart)
        base = min(8.0, 2.0**i)
        assert 0.75 * base <= d.delay <= 1.25 * base
    assert len({round(d.delay / min(8.0, 2.0**i), 6) for i, d in enumerate(seq_a)}) > 1  # type: ignore[union-attr]


def test_intensity_limit_gives_up_and_escalates() -> None:
    t = RestartTracker(policy(K.ALWAYS, max_restarts=3, window=10.0))
    for now in (0.0, 1.0, 2.0):
        assert isinstance(t.decide(CRASH, now), Restart)
    d = t.decide(CRASH, 3.0)
    assert isinstance(d, GiveUp)
    assert d.escalate
    assert "restart limit reached (3 in 10 s)" in d.reason
    assert t.restarts == 3


def test_intensity_window_slides() -> None:
    t = RestartTracker(policy(K.ALWAYS, max_restarts=2, window=10.0))
    assert isinstance(t.decide(CRASH, 0.0), Restart)
    assert isinstance(t.decide(CRASH, 5.0), Restart)
    assert isinstance(t.decide(CRASH, 9.0), GiveUp)
    # At 10.5 the restart at 0.0 has left the window.
    assert isinstance(t.decide(CRASH, 10.5), Restart)
    assert isinstance(t.decide(CRASH, 11.0), GiveUp)


def test_zero_budget_gives_up_at_once() -> None:
    assert isinstance(RestartTracker(policy(K.ALWAYS, max_restarts=0)).decide(CRASH, 0.0), GiveUp)


def test_forever_never_gives_up() -> None:
    t = RestartTracker(policy(K.ON_FAILURE, max_restarts=-1, window=1.0))
    assert all(isinstance(t.decide(CRASH, i * 1e-3), Restart) for i in range(5000))


def test_failed_starts_count_against_budget() -> None:
    t = RestartTracker(policy(K.ON_FAILURE, max_restarts=2, window=60.0))
    early = ExitReport(code=1, failed_start=True, ran_for=0.2)
    assert isinstance(t.decide(early, 0.0), Restart)
    assert isinstance(t.decide(early, 1.0), Restart)
    d = t.decide(early, 2.0)
    assert isinstance(d, GiveUp)
    assert d.reason.startswith("failed start: exited with code 1")


def test_exponent_resets_after_a_stable_run() -> None:
    t = RestartTracker(
        RestartPolicy(
            policy=K.ALWAYS,
            backoff=Backoff(initial=1.0, max=4.0, multiplier=2.0, jitter=0.0),
            max_restarts=-1,
        )
    )
    assert [t.decide(CRASH, float(i)).delay for i in range(3)] == [1.0, 2.0, 4.0]  # type: ignore[union-attr]
    d = t.decide(ExitReport(code=1, ran_for=4.0), 10.0)
    assert isinstance(d, Restart)
    assert (d.delay, d.attempt) == (1.0, 0)
    # A failed start never resets the exponent, however long the start window.
    d = t.decide(ExitReport(code=1, ran_for=100.0, failed_start=True), 20.0)
    assert isinstance(d, Restart)
    assert d.attempt == 1


def test_reset_forgets_budget_and_exponent() -> None:
    t = RestartTracker(policy(K.ALWAYS, max_restarts=1))
    assert isinstance(t.decide(CRASH, 0.0), Restart)
    assert isinstance(t.decide(CRASH, 0.1), GiveUp)
    t.reset()
    d = t.decide(CRASH, 0.2)
    assert isinstance(d, Restart)
    assert d.attempt == 0


@pytest.mark.parametrize(
    ("exit", "text"),
    [
        (CRASH, "exited with code 1"),
        (KILLED, "killed by SIGKILL"),
        (UNKNOWN, "exited (status unknown)"),
        (UNHEALTHY, "unhealthy"),
    ],
)
def test_reasons_name_the_exit(exit: ExitReport, text: str) -> None:
    d = RestartTracker(policy(K.ALWAYS)).decide(exit, 0.0)
    assert isinstance(d, Restart)
    assert d.reason.startswith(text)
