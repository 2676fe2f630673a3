"""The embedded Redis is durable by default: SIGKILL it, start it on the same data directory,
and every tenant, token, session and accepted request is still there."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.redis_server import RedisServer, RedisServerError
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerProcess, BrokerServer, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path / "redis")
    with server:
        yield server


async def _health_ok(url: str) -> bool:
    async with BrokerClient(url, None) as anonymous:
        try:
            return bool((await anonymous.health())["status"] == "ok")
        except Exception:  # 503 degraded while Redis restarts
            return False


async def test_sigkilled_redis_restarted_on_its_dir_keeps_tokens_and_accepted_requests(
    durable_redis: RedisServer,
) -> None:
    # auth_cache_s=0: every token is looked up in Redis, so a lost token would show.
    broker = BrokerServer(durable_redis.url, auth_cache_s=0)
    broker.start()
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            accepted = await session.client.enqueue(p.LLMRequest(prompt="kept?"), wait_s=0)
            assert accepted.status == "pending"  # accepted means stored

            pid = durable_redis.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            durable_redis.kill()
            durable_redis.start()  # same port, same directory
            await wait_until(lambda: _health_ok(broker.url), timeout_s=30)

            # The tenant token and the session token still authenticate...
            other = await tenant.client.create_session()
            assert other.session_id
            # ...and the request accepted before the crash is delivered and answered.
            (delivered,) = (await tenant.client.pending(wait_s=10)).requests
            assert (delivered.id, delivered.prompt) == (accepted.id, "kept?")
            await tenant.client.respond(p.Answer(id=delivered.id, response="yes"))
            result = await session.client.wait_result(accepted, wait_s=10)
            assert result.response == "yes"
    finally:
        broker.stop()


def test_the_data_dir_is_private_and_held_by_one_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    with RedisServer(data_dir=data_dir):
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert any(data_dir.rglob("*.aof")), "no append-only file was written"
        with pytest.raises(RedisServerError, match="in use"):
            RedisServer(data_dir=data_dir).start()
    with RedisServer(data_dir=data_dir):  # free again once the first one stopped
        pass


async def test_rlm_broker_killed_with_its_redis_comes_back_with_everything(
    tmp_path: Path,
) -> None:
    """`rlm broker` without RLM_REDIS_URL: both processes SIGKILLed, then started again."""
    redis_dir = str(tmp_path / "redis")
    broker = BrokerProcess(None, RLM_REDIS_DIR=redis_dir, RLM_AUTH_CACHE_S="0")
    broker.start()
    redis_pid = _child(broker.pid)
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            accepted = await session.client.enqueue(p.LLMRequest(prompt="q"), wait_s=0)
            os.kill(redis_pid, signal.SIGKILL)
            broker.kill()
            await asyncio.to_thread(_wait_gone, redis_pid)

            broker = BrokerProcess(
                None, port=broker.port, RLM_REDIS_DIR=redis_dir, RLM_AUTH_CACHE_S="0"
            )
            broker.start()
            redis_pid = _child(broker.pid)
            (delivered,) = (await tenant.client.pending(wait_s=10)).requests
            assert delivered.id == accepted.id
            await tenant.client.respond(p.Answer(id=delivered.id, response="a"))
            assert (await session.client.wait_result(accepted, wait_s=10)).response == "a"
    finally:
        broker.stop()


def _child(pid: int) -> int:
    (child,) = (
        int(c) for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    )  # fmt: skip
    return child


def _wait_gone(pid: int) -> None:
    for _ in range(500):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"
