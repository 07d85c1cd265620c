"""The controller's JetStream state: stream ``EVENTS`` and four KV buckets.

Every controller calls :func:`ensure_state` at start; creating what exists
already is a no-op, so any number of controllers may race here. Replicas
follow the cluster: 1 on a single server, 3 (at most the server count) on a
cluster, unless configured.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

__all__ = [
    "AGENTS_BUCKET",
    "EVENTS_STREAM",
    "LEASE_BUCKET",
    "NODES_BUCKET",
    "OBSERVED_BUCKET",
    "Buckets",
    "StreamSettings",
    "cluster_size",
    "ensure_bucket",
    "ensure_state",
    "ensure_stream",
]

EVENTS_STREAM = "EVENTS"
NODES_BUCKET = "fabric_nodes"
AGENTS_BUCKET = "fabric_agents"
OBSERVED_BUCKET = "fabric_observed"
LEASE_BUCKET = "fabric_lease"


@dataclass(frozen=True, slots=True)
class StreamSettings:
    replicas: int | None = None
    """None: follow the cluster size (at most 3)."""
    events_max_age: float = 7 * 24 * 3600.0
    events_max_bytes: int = 1 << 30
    lease_ttl: float = 3.0


@dataclass(frozen=True, slots=True)
class Buckets:
    nodes: KeyValue
    agents: KeyValue
    observed: KeyValue
    lease: KeyValue


def cluster_size(nc: Client) -> int:
    """Servers in the cluster as the connected server advertises them.

    ``connect_urls`` lists the client URLs of the cluster's servers (this one
    included); a lone server sends none.
    """
    info = nc._server_info  # nats-py keeps the INFO it received; no public accessor
    urls = info.get("connect_urls") or []
    if info.get("cluster"):
        # Right after start-up a member may not know every peer yet, and a
        # stream made R2 then would stall when one server goes: a cluster
        # counts as (at least) three, the size the fabric's R3 needs.
        return max(3, len(set(urls)))
    return max(1, len(set(urls)))


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The KV bucket, created with ``config`` when it does not exist yet."""
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        # Another controller created it in between.
        return await js.key_value(config.bucket)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream with ``config`` unless it exists (an existing one is left as it is)."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
        return
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.stream_info(config.name)  # created by another controller meanwhile


async def ensure_state(nc: Client, js: JetStreamContext, settings: StreamSettings) -> Buckets:
    replicas = settings.replicas or min(3, cluster_size(nc))
    events = StreamConfig(
        name=EVENTS_STREAM,
        subjects=["events.>"],
        retention=RetentionPolicy.LIMITS,
        max_age=settings.events_max_age,
        max_bytes=settings.events_max_bytes,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    await ensure_stream(js, events)
    nodes = await ensure_bucket(
        js, KeyValueConfig(bucket=NODES_BUCKET, history=1, replicas=replicas)
    )
    agents = await ensure_bucket(
        js, KeyValueConfig(bucket=AGENTS_BUCKET, history=1, replicas=replicas)
    )
    observed = await ensure_bucket(
        js, KeyValueConfig(bucket=OBSERVED_BUCKET, history=1, replicas=replicas)
    )
    # Every message in the lease bucket dies after the lease TTL, so each
    # renewal (a plain update) restarts the clock, and a dead leader's key
    # disappears by itself.
    lease = await ensure_bucket(
        js,
        KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=settings.lease_ttl, replicas=replicas),
    )
    return Buckets(nodes=nodes, agents=agents, observed=observed, lease=lease)
