"""Shared fixtures: a real Redis server per test process, flushed between tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from broker.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis-compatible server for this test process (pytest-xdist: one per worker)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The URL of a running, empty Redis; restarted if an earlier test killed it."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url
