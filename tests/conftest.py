"""Shared fixtures: a real Redis server per test process, flushed between tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from broker.redis_server import RedisServer
from tests.support.servers import BrokerServer


def pytest_configure(config: pytest.Config) -> None:
    """A private data home per test process: `rlm up` and `rlm broker` keep their Redis, the
    trajectories and the ledger under it, never in the user's real one, and two test
    processes never share (and lock) one Redis directory."""
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="rlm-test-data-")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis-compatible server for this test process (pytest-xdist: one per worker)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, empty Redis; restarted if an earlier test killed it."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def broker_factory(redis_url: str) -> Iterator[Callable[..., BrokerServer]]:
    """Starts real brokers (uvicorn in a thread) on the test's Redis; settings as keywords
    (`server_class`: a `BrokerServer` subclass to start instead)."""
    started: list[BrokerServer] = []

    def start(server_class: type[BrokerServer] = BrokerServer, **overrides: Any) -> BrokerServer:
        server = server_class(redis_url, **overrides)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def broker_server(broker_factory: Callable[..., BrokerServer]) -> BrokerServer:
    """A running broker with default settings: `.url`, `.admin_token`, `.settings`."""
    return broker_factory()
