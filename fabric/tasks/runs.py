"""What a dispatcher keeps about a task it has handed to an agent, and how a
run that did not end in a result is settled."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.msg import Msg

from schemas.task import Task

__all__ = ["Back", "Run"]


@dataclass(slots=True)
class Run:
    task: Task
    msg: Msg
    agent_id: str
    attempt: int
    last_heard: float
    """Loop time of the agent's last word about this task (progress or keepalive)."""
    progress: tuple[float | None, str] | None = None
    """Progress reported and not yet written to the record."""


@dataclass(frozen=True, slots=True)
class Back:
    """The task goes back to the queue; ``counts``: an attempt was used."""

    error: str
    counts: bool
    shun: bool = False
    """The agent did not answer at all: leave it out of choices for a while."""
