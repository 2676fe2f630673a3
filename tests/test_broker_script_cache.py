"""The broker survives Redis losing its script cache (a restart, SCRIPT FLUSH)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.redis_server import RedisServer
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import Answer, LLMRequest
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer


@pytest.mark.anyio
async def test_pending_still_leases_after_redis_forgot_the_scripts(
    broker_server: BrokerServer, redis_url: str
) -> None:
    url = broker_server.url
    async with BrokerClient(url, broker_server.admin_token) as admin:
        tenant = await admin.create_tenant("t")
    async with BrokerClient(url, tenant.token) as poller:
        session = await poller.create_session()
        async with BrokerClient(url, session.token) as sandbox:
            first = await sandbox.enqueue(LLMRequest(prompt="one"), wait_s=0)
            assert [r.id for r in (await poller.pending(wait_s=0)).requests] == [first.id]
            redis = aioredis.Redis.from_url(redis_url)
            try:
                await redis.script_flush()
            finally:
                await redis.aclose()
            second = await sandbox.enqueue(LLMRequest(prompt="two"), wait_s=0)
            assert [r.id for r in (await poller.pending(wait_s=0)).requests] == [second.id]


@pytest.mark.anyio
async def test_a_round_trip_after_redis_restarted_runs_every_hot_script_again(
    tmp_path: Path,
) -> None:
    # A durable Redis keeps the tenant and tokens across its restart but not its scripts:
    # enqueue, claim and answer each meet NOSCRIPT once and must load and run exactly once.
    # And the broker's pooled connections from before the restart are connected again,
    # not used (the old pool sent one call down each of them: a 503 each).
    with RedisServer(data_dir=tmp_path / "redis") as redis_server:
        broker = BrokerServer(redis_server.url)
        broker.start()
        try:
            async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
                await _round_trip(tenant.client, session.client, "before")
                redis_server.stop()
                redis_server.start()  # same port, same directory, empty script cache
                await _round_trip(tenant.client, session.client, "after")
                # The restarted server's own counts: the three scripts were loaded again.
                redis = aioredis.Redis.from_url(redis_server.url)
                try:
                    stats = await redis.info("commandstats")
                finally:
                    await redis.aclose()
                assert stats["cmdstat_script|load"]["calls"] >= 3
        finally:
            broker.stop()


async def _round_trip(poller: BrokerClient, sandbox: BrokerClient, prompt: str) -> None:
    accepted = await sandbox.enqueue(LLMRequest(prompt=prompt), wait_s=0)
    (delivered,) = (await poller.pending(wait_s=10)).requests
    assert (delivered.id, delivered.prompt) == (accepted.id, prompt)
    await poller.respond(Answer(id=delivered.id, response=prompt.upper()))
    result = await sandbox.wait_result(accepted, wait_s=10)
    assert result.response == prompt.upper()
    assert (await poller.pending(wait_s=0)).requests == []  # nothing enqueued twice
