"""The task queue's JetStream state: streams ``TASKS`` and ``TASKS_DEAD``, the
shared durable consumer ``dispatch`` and the ``fabric_tasks`` KV bucket.

==================  =====================  =======================================
name                subjects               what
==================  =====================  =======================================
``TASKS``           ``tasks.*.queue``      work-queue retention: a task leaves the
                                           stream once acked or termed; duplicate
                                           window for ``Nats-Msg-Id`` = task id
``TASKS_DEAD``      ``tasks.*.dead``       limits retention: tasks that spent their
                                           attempts, with their last error
``dispatch``        (on ``TASKS``)         the one durable pull consumer every
                                           controller fetches from: explicit ack,
                                           ack wait, max deliver; retry backoff
                                           is the dispatcher's nak delays
``fabric_tasks``    KV                     one record per task id
==================  =====================  =======================================

Fire-and-forget tasks (``tasks.<type>.direct``, core NATS) are not captured
by either stream: the filters end in ``.queue`` and ``.dead``.

Every dispatcher calls :func:`ensure_task_state` at start; creating what
exists already is a no-op, so any number of controllers may race here. An
existing consumer is left as it is (its settings are the first creator's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from fabric.controller.streams import cluster_size, ensure_bucket, ensure_stream
from schemas.ids import validate_id

__all__ = [
    "DEAD_STREAM",
    "DEAD_SUBJECTS",
    "DIRECT_SUFFIX",
    "DISPATCH_CONSUMER",
    "QUEUE_SUBJECTS",
    "RECORDS_BUCKET",
    "TASKS_STREAM",
    "QueueSettings",
    "allow_direct_get",
    "dead_subject",
    "direct_subject",
    "ensure_task_state",
]

log = logging.getLogger(__name__)

TASKS_STREAM = "TASKS"
DEAD_STREAM = "TASKS_DEAD"
RECORDS_BUCKET = "fabric_tasks"
DISPATCH_CONSUMER = "dispatch"
QUEUE_SUBJECTS = "tasks.*.queue"
DEAD_SUBJECTS = "tasks.*.dead"
DIRECT_SUFFIX = "direct"


def dead_subject(task_type: str) -> str:
    return f"tasks.{validate_id(task_type, 'task type')}.dead"


def direct_subject(task_type: str) -> str:
    """Core-NATS, at-most-once tasks: never stored, never retried."""
    return f"tasks.{validate_id(task_type, 'task type')}.{DIRECT_SUFFIX}"


@dataclass(frozen=True, slots=True)
class QueueSettings:
    replicas: int | None = None
    """None: follow the cluster size (at most 3)."""
    duplicate_window: float = 120.0
    """A task id submitted twice within this many seconds is stored once."""
    ack_wait: float = 30.0
    """A fetched task goes back to the queue after this long without an ack
    or an in-progress from its dispatcher (which sends one every third of it)."""
    max_deliver: int = 1000
    """Deliveries before JetStream stops redelivering; far above any max_attempts
    because waiting for a capable agent also redelivers."""
    max_ack_pending: int = 20_000
    max_queue_bytes: int = 8 << 30
    dead_max_age: float = 30 * 24 * 3600.0
    records_max_age: float = 7 * 24 * 3600.0
    """Task records expire after this long (KV bucket max age)."""


async def allow_direct_get(js: JetStreamContext, stream: str) -> bool:
    """Turn on ``allow_direct`` for ``stream`` (batch direct gets, nats-server 2.11+);
    False when the server cannot."""
    try:
        info = await js.stream_info(stream)
        config = info.config
        if not config.allow_direct:
            config.allow_direct = True
            await js.update_stream(config)
        return True
    except (nats.errors.Error, TimeoutError) as exc:
        log.info("stream %s: direct gets not available (%s)", stream, exc)
        return False


async def _consumer(js: JetStreamContext, config: ConsumerConfig) -> None:
    assert config.durable_name is not None
    try:
        await js.consumer_info(TASKS_STREAM, config.durable_name)
        return
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_consumer(TASKS_STREAM, config)
    except nats.js.errors.BadRequestError:
        await js.consumer_info(TASKS_STREAM, config.durable_name)


async def ensure_task_state(nc: Client, js: JetStreamContext, settings: QueueSettings) -> KeyValue:
    """Create (if missing) both streams, the consumer and the bucket; return the bucket."""
    replicas = settings.replicas or min(3, cluster_size(nc))
    await ensure_stream(
        js,
        StreamConfig(
            name=TASKS_STREAM,
            subjects=[QUEUE_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=settings.duplicate_window,
            max_bytes=settings.max_queue_bytes,
        ),
    )
    await ensure_stream(
        js,
        StreamConfig(
            name=DEAD_STREAM,
            subjects=[DEAD_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=settings.duplicate_window,
            max_age=settings.dead_max_age,
        ),
    )
    await _consumer(
        js,
        ConsumerConfig(
            durable_name=DISPATCH_CONSUMER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=settings.max_deliver,
            # No consumer BackOff list: retry delays are the dispatcher's nak
            # delays. With BackOff set, nats-server 2.15 stretches a nak delay
            # on delivery n by BackOff[n-1] - AckWait (a 2 s nak on the 2nd
            # delivery of a [30, 60] list came back after 32 s), so the two
            # cannot be combined.
            max_ack_pending=settings.max_ack_pending,
            filter_subject=QUEUE_SUBJECTS,
        ),
    )
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=RECORDS_BUCKET,
            history=1,
            replicas=replicas,
            ttl=settings.records_max_age,
        ),
    )
