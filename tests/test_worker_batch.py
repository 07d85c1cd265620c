"""The worker SDK's batch path against a real server: TaskBatch messages sent as a
controller would (header ``Fabric-Batch: 1``, one reply inbox), every TaskResults
reply collected, through the worker identity's real permissions."""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from natsfixtures import Clients, ErrorLog
from workers.rig import Events

from fabric.worker import MAX_RESULTS_BYTES, TaskContext, Worker
from schemas import subjects
from schemas.codec import decode, encode
from schemas.common import utc_now
from schemas.errors import ErrorCode, ErrorReply
from schemas.task import (
    BATCH_HEADER,
    Task,
    TaskAssignment,
    TaskBatch,
    TaskOutcome,
    TaskResult,
    TaskResults,
)

BATCH = {BATCH_HEADER: "1"}


@dataclass
class Handler:
    """The test handler's state: an event per gate name, calls per task id."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    active: set[str] = field(default_factory=set)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def __call__(self, ctx: TaskContext, payload: Any) -> Any:
        self.calls[ctx.task_id] += 1
        self.active.add(ctx.task_id)
        try:
            if isinstance(payload, dict) and "gate" in payload:
                await self.gate(payload["gate"]).wait()
            if payload == "progress":
                await ctx.progress(0.5, "half")
            if payload == "raise":
                raise ValueError("bad input")
            if payload == "unencodable":
                return object()
            if isinstance(payload, dict) and "big" in payload:
                return "x" * payload["big"]
            return {"got": payload}
        finally:
            self.active.discard(ctx.task_id)


@dataclass
class Worked:
    worker: Worker
    handler: Handler
    ctl: Client
    errors: ErrorLog
    """Errors the worker's connection saw (permission violations among them)."""


@asynccontextmanager
async def running(
    connect_as: Clients, *, grace: float = 0.3, concurrency: int = 8
) -> AsyncIterator[Worked]:
    """Worker ``w1`` as identity work-1 serving ``echo``, and a controller client."""
    errors = ErrorLog()
    worker = Worker("w1", nc=await connect_as("work-1", error_cb=errors), grace=grace)
    handler = Handler()
    worker.task("echo", concurrency=concurrency)(handler)
    runner = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 5)
    try:
        yield Worked(worker, handler, await connect_as("ctl-1"), errors)
    finally:
        worker.stop()
        for gate in handler.gates.values():
            gate.set()
        await asyncio.wait_for(runner, 10)


@dataclass
class Replies:
    """Every message that came back to one batch's reply inbox, in order."""

    raw: list[bytes] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_msg(self, msg: Msg) -> None:
        async with self.changed:
            self.raw.append(msg.data)
            self.changed.notify_all()

    @property
    def messages(self) -> list[TaskResults]:
        return [decode(data, TaskResults) for data in self.raw]

    @property
    def results(self) -> dict[str, TaskResult]:
        """Results by task id; a task answered twice fails the test here."""
        seen = [r for m in self.messages for r in m.results]
        ids = Counter(r.task_id for r in seen)
        assert all(n == 1 for n in ids.values()), f"answered more than once: {ids}"
        return {r.task_id: r for r in seen}

    async def until(self, cond: Callable[[Replies], bool], within: float = 5) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: cond(self))

    async def until_answered(self, *task_ids: str, within: float = 5) -> dict[str, TaskResult]:
        await self.until(lambda r: set(task_ids) <= set(r.results), within)
        return self.results


def batch(*tasks: tuple[str, Any] | tuple[str, Any, str]) -> bytes:
    """A TaskBatch of ``(task_id, payload[, task_type])``, attempt 1 each."""
    assignments = [
        TaskAssignment(
            task=Task(id=t[0], type=t[2] if len(t) > 2 else "echo", payload=t[1]),
            attempt=1,
            ack_wait=3.0,
        )
        for t in tasks
    ]
    return encode(TaskBatch(assignments=assignments))


async def send(ctl: Client, body: bytes, agent_id: str = "w1") -> Replies:
    """Publish ``body`` as a batch with its own reply inbox; the replies as they come."""
    replies = Replies()
    inbox = ctl.new_inbox()
    await ctl.subscribe(inbox, cb=replies.on_msg)
    await ctl.publish(subjects.agent_tasks(agent_id), body, reply=inbox, headers=BATCH)
    await ctl.flush()
    return replies


async def test_results_finished_together_share_one_message(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        replies = await send(w.ctl, batch(*((f"t{i}", i) for i in range(8))))
        results = await replies.until_answered(*(f"t{i}" for i in range(8)))
        assert {r.outcome for r in results.values()} == {TaskOutcome.SUCCEEDED}
        assert [results[f"t{i}"].result for i in range(8)] == [{"got": i} for i in range(8)]
        assert {r.agent_id for r in results.values()} == {"w1"}
        assert len(replies.raw) == 1, "all eight finished in one turn"
        assert w.worker.counts == {"succeeded": 8, "failed": 0, "handed_back": 0}


async def test_a_big_flush_is_split_under_the_size_limit(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        big = {"big": 200_000}
        replies = await send(w.ctl, batch(("b0", big), ("b1", big), ("b2", big)))
        results = await replies.until_answered("b0", "b1", "b2")
        assert all(len(r.result) == 200_000 for r in results.values())
        assert [len(m.results) for m in replies.messages] == [2, 1]
        assert max(len(data) for data in replies.raw) <= MAX_RESULTS_BYTES


async def test_a_slow_task_holds_back_no_other(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        slow = w.handler.gate("slow")
        replies = await send(w.ctl, batch(("s", {"gate": "slow"}), ("f1", 1), ("f2", 2)))
        fast = await replies.until_answered("f1", "f2")
        # Answered while the slow handler is still blocked on its gate.
        assert "s" not in fast and "s" in w.handler.active and not slow.is_set()
        assert fast["f1"].outcome is TaskOutcome.SUCCEEDED
        slow.set()
        results = await replies.until_answered("s")
        assert results["s"].result == {"got": {"gate": "slow"}}
        assert len(replies.raw) == 2


async def test_one_batch_gets_many_replies_through_the_worker_permissions(
    connect_as: Clients,
) -> None:
    # Each task finishes alone, so each result is its own reply to the one request:
    # nats-server's default allowance (one reply per request) would drop all but one.
    async with running(connect_as) as w:
        ids = [f"r{i}" for i in range(4)]
        replies = await send(w.ctl, batch(*((i, {"gate": i}) for i in ids)))
        for n, task_id in enumerate(ids, 1):
            w.handler.gate(task_id).set()
            await replies.until_answered(task_id)
            assert len(replies.raw) == n
        assert not w.errors.violations


async def test_progress_is_reported_per_task(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        events = Events()
        await w.ctl.subscribe("events.task.progress", cb=events.on_msg)
        await w.ctl.flush()
        replies = await send(w.ctl, batch(("p1", "progress"), ("p2", "progress")))
        await replies.until_answered("p1", "p2")

        def reported() -> dict[str, tuple[int, float]]:
            half = events.matching(lambda e: e["data"]["message"] == "half")
            return {e["subject"]: (e["data"]["attempt"], e["data"]["fraction"]) for e in half}

        await events.wait_for(lambda _: len(reported()) == 2)
        assert reported() == {"p1": (1, 0.5), "p2": (1, 0.5)}


async def test_failures_are_answered_per_task(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        body = batch(("ok", 1), ("raised", "raise"), ("odd", "unencodable"), ("u", 1, "resize"))
        replies = await send(w.ctl, body)
        results = await replies.until_answered("ok", "raised", "odd", "u")
        assert results["ok"].outcome is TaskOutcome.SUCCEEDED
        assert (results["raised"].outcome, results["raised"].error) == (
            TaskOutcome.FAILED,
            "ValueError: bad input",
        )
        assert results["odd"].outcome is TaskOutcome.FAILED
        assert "not JSON-encodable" in (results["odd"].error or "")
        assert results["u"].outcome is TaskOutcome.FAILED
        assert "has no 'resize'" in (results["u"].error or "")
        assert w.worker.counts == {"succeeded": 1, "failed": 3, "handed_back": 0}


async def test_duplicates_are_answered_once(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        # "held" is running from an earlier single assignment: that request answers it.
        single = Task(id="held", type="echo", payload={"gate": "held"})
        first = asyncio.create_task(
            w.ctl.request(
                subjects.agent_tasks("w1"),
                encode(TaskAssignment(task=single, attempt=1, ack_wait=3.0)),
                timeout=5,
            )
        )
        async with asyncio.timeout(5):
            while "held" not in w.handler.active:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # wait-ok: polling the handler under a deadline
        replies = await send(w.ctl, batch(("d", 1), ("d", 1), ("held", {"gate": "held"})))
        await replies.until_answered("d")
        w.handler.gate("held").set()
        assert decode((await first).data, TaskResult).task_id == "held"
        # Each ran once (a second run of either would have been counted on entry).
        assert w.handler.calls == Counter({"d": 1, "held": 1})
        assert set(replies.results) == {"d"}
        assert w.worker.counts["succeeded"] == 2


async def test_drain_hands_back_waiting_and_late_tasks(connect_as: Clients) -> None:
    async with running(connect_as, grace=0.3, concurrency=2) as w:
        ids = ["a", "b", "c"]
        replies = await send(w.ctl, batch(*((i, {"gate": "never"}) for i in ids)))
        async with asyncio.timeout(5):
            while len(w.handler.active) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # wait-ok: polling the handler under a deadline
        waiting = (set(ids) - w.handler.active).pop()
        w.worker.stop()
        # The one waiting for a slot goes back at once; the two running after the grace.
        first = await replies.until_answered(waiting)
        assert first[waiting].outcome is TaskOutcome.RETRY
        results = await replies.until_answered(*ids)
        assert {r.outcome for r in results.values()} == {TaskOutcome.RETRY}
        assert {r.error for r in results.values()} == {"worker draining: handed back"}
        assert w.worker.counts == {"succeeded": 0, "failed": 0, "handed_back": 3}


async def test_a_batch_during_the_drain_is_handed_back(connect_as: Clients) -> None:
    async with running(connect_as, grace=10, concurrency=1) as w:
        replies = await send(w.ctl, batch(("run", {"gate": "run"}), ("wait", 1)))
        # A batch received by the worker's own connection (so its reply is allowed),
        # fed to the worker once it drains: the wire cannot hit that window on purpose.
        late_sub = await w.worker.nc.subscribe(subjects.agent_tasks("w9"))  # type: ignore[union-attr]
        await w.worker.nc.flush()  # type: ignore[union-attr]  # the server has the interest
        late_replies = await send(w.ctl, batch(("l1", 1), ("l2", 2), ("l1", 1)), agent_id="w9")
        late = await late_sub.next_msg(timeout=5)
        async with asyncio.timeout(5):
            while "run" not in w.handler.active:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # wait-ok: polling the handler under a deadline
        w.worker.stop()
        assert (await replies.until_answered("wait"))["wait"].outcome is TaskOutcome.RETRY
        await w.worker._on_assignment(late)
        handed = await late_replies.until_answered("l1", "l2")
        assert {r.outcome for r in handed.values()} == {TaskOutcome.RETRY}
        assert len(late_replies.raw) == 1
        assert w.handler.calls["l1"] == 0
        # The running one still has its grace, and finishes in it.
        w.handler.gate("run").set()
        assert (await replies.until_answered("run"))["run"].outcome is TaskOutcome.SUCCEEDED


async def test_a_bad_batch_gets_one_error_reply(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        subject = subjects.agent_tasks("w1")
        cases = [
            (b'{"assignments": []}', BATCH),
            (b"not json", BATCH),
            (encode(msgspec.to_builtins({"assignments": [{"task": 1}]})), BATCH),
            (batch(("v", 1)), {BATCH_HEADER: "2"}),
        ]
        for body, headers in cases:
            reply = await w.ctl.request(subject, body, headers=headers, timeout=5)
            refusal = decode(reply.data, ErrorReply)
            assert refusal.code is ErrorCode.INVALID_PAYLOAD, body
        assert w.handler.calls == Counter()


async def test_the_single_path_is_unchanged_beside_batches(connect_as: Clients) -> None:
    async with running(connect_as) as w:
        task = Task(id="one", type="echo", payload=7, submitted_at=utc_now())
        body = encode(TaskAssignment(task=task, attempt=1, ack_wait=3.0))
        reply = await w.ctl.request(subjects.agent_tasks("w1"), body, timeout=5)
        assert decode(reply.data, TaskResult).result == {"got": 7}
        replies = await send(w.ctl, batch(("two", 8)))
        assert (await replies.until_answered("two"))["two"].result == {"got": 8}


async def test_each_handler_runs_in_a_context_of_its_own(connect_as: Clients) -> None:
    # One slot: the tasks run one after another, each in a context of its own as a
    # task of its own would give it; a handler may return any awaitable.
    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("var", default=None)
    seen: dict[str, str | None] = {}
    worker = Worker("w1", nc=await connect_as("work-1"), grace=0.3)

    @worker.task("echo", concurrency=1)
    async def echo(ctx: TaskContext, payload: Any) -> Any:
        seen[ctx.task_id] = var.get()
        var.set(ctx.task_id)
        await asyncio.sleep(0)
        assert var.get() == ctx.task_id
        return payload

    def later(ctx: TaskContext, payload: Any) -> asyncio.Future[Any]:
        seen[ctx.task_id] = var.get()
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, done.set_result, payload)
        return done

    worker.task("later", concurrency=1)(later)
    runner = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 5)
    try:
        ctl = await connect_as("ctl-1")
        ids = ["c1", "c2", "c3", "l1", "l2"]
        body = batch(("c1", 1), ("c2", 2), ("c3", 3), ("l1", 4, "later"), ("l2", 5, "later"))
        results = await (await send(ctl, body)).until_answered(*ids)
        assert [results[i].result for i in ids] == [1, 2, 3, 4, 5]
        assert seen == dict.fromkeys(ids)
        assert worker.counts == {"succeeded": 5, "failed": 0, "handed_back": 0}
        assert not worker._held
    finally:
        worker.stop()
        await asyncio.wait_for(runner, 10)
