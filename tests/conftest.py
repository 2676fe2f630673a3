"""Shared fixtures: a real Redis server per test process, flushed between tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.redis_server import RedisServer
from rlm_wire import broker_models as bp
from tests.support.brokers import echo_answers, tenant_and_session
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


#: `poller_process(broker_url, admin_token, llm_base_url, **RLM_vars)` -> the child.
PollerStarter = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def poller_process(tmp_path: Path) -> Iterator[PollerStarter]:
    """Starts `rlm poller` children (admin token, sub-calls to the scripted LLM at
    `llm_base_url`, no sub-RLMs), each logging to `tmp_path`; kills (and first wakes, if a
    test stopped it) any still running at the end."""
    children: list[subprocess.Popen[bytes]] = []

    def start(
        broker_url: str, admin_token: str, llm_base_url: str, **env: str
    ) -> subprocess.Popen[bytes]:
        profile = {"name": "sub", "base_url": llm_base_url, "model": "fake-sub", "max_retries": 0}
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")} | {
            "RLM_BROKER_URL": broker_url,
            "RLM_ADMIN_TOKEN": admin_token,
            "RLM_LLM_PROFILES": json.dumps([profile]),
            "RLM_POLLER_WAIT_S": "1",
            "RLM_POLLER_SUB_RLMS": "false",
            "RLM_LOG_LEVEL": "INFO",
            **env,
        }
        log = (tmp_path / f"poller-{len(children)}.log").open("wb")
        rlm = Path(sys.executable).with_name("rlm")
        child = subprocess.Popen(
            [str(rlm), "poller"], env=environ, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(timeout=10)


@pytest.fixture
async def broker_session(
    broker_server: BrokerServer,
) -> AsyncIterator[tuple[str, list[bp.PendingRequest]]]:
    """A broker session token, with a poller answering `echo:<prompt>` (the requests it
    answered are kept in the list)."""
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, bs):
        seen: list[bp.PendingRequest] = []
        stop = asyncio.Event()
        task = asyncio.create_task(echo_answers(tenant.client, seen, stop))
        try:
            yield bs.token, seen
        finally:
            stop.set()
            await task
