"""Shared fixtures: a test PKI and real nats-server processes over mutual TLS.

``pki`` (session)
    :class:`natsfixtures.FabricPki` with one identity per role: controller
    ``ctl-1``, nodes ``n1`` and ``n2``, operator ``op-1``, viewer ``view-1``,
    worker ``work-1``. ``pki["n1"].cert`` / ``.key``, ``pki.ca``, ``pki.dir``.
    Shared by every module: never revoke or re-issue in it; a test that changes
    identities makes its own with ``natsfixtures.make_pki(tmp_path / "pki")``.
``nats_server`` (module)
    A running :class:`fabric.nats_server.NatsServer` on a free loopback port,
    JetStream on, users from ``pki``. One per test module, so streams and KV
    buckets one module creates do not leak into another; tests in a module
    share it, so give streams names your module owns. Stopped by pid at the
    end of the module.
``connect_as`` (function, async)
    ``nc = await connect_as("op-1", error_cb=..., ...)`` connects to
    ``nats_server`` as that identity through :func:`fabric.connect.connect`;
    every client is closed after the test.
``nats_clients`` (function, async)
    Like ``connect_as`` with no default server:
    ``await nats_clients("ctl-1", nats_cluster.urls)``.
``nats_cluster`` (module)
    A running 3-server :class:`fabric.nats_server.NatsCluster` (TLS routes,
    JetStream meta leader elected); ``nats_cluster.urls``, ``nats_cluster[i]``.
    A test that kills a member starts it again before it returns.

Async fixtures here use the default function loop scope: use them from tests
that run in the default (function) loop.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator

import pytest
from natsfixtures import Clients, FabricPki, make_pki, run_sync

from fabric.nats_server import NatsCluster, NatsServer


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`pytest &`, nohup, some CI runners)
    # with SIGINT ignored, and an ignored signal stays ignored across exec:
    # every process the tests spawn would then ignore SIGINT, and the tests
    # that press Ctrl-C on one (`fabric logs -f`, an agent's stop signal)
    # would wait for nothing. A handler of our own is reset to the default
    # in each child, as in a suite run from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FabricPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def nats_server(pki: FabricPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer.local(pki.dir, tmp_path_factory.mktemp("nats"))
    run_sync(server.start())
    try:
        yield server
    finally:
        run_sync(server.stop())


@pytest.fixture(scope="module")
def nats_cluster(pki: FabricPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(pki.dir, tmp_path_factory.mktemp("cluster"), probe=pki["ctl-1"])
    run_sync(cluster.start())
    try:
        yield cluster
    finally:
        run_sync(cluster.stop())


@pytest.fixture
async def nats_clients(pki: FabricPki) -> AsyncIterator[Clients]:
    clients = Clients(pki)
    try:
        yield clients
    finally:
        await clients.aclose()


@pytest.fixture
async def connect_as(pki: FabricPki, nats_server: NatsServer) -> AsyncIterator[Clients]:
    clients = Clients(pki, default_urls=nats_server.url)
    try:
        yield clients
    finally:
        await clients.aclose()
