"""The broker survives Redis losing its script cache (a restart, SCRIPT FLUSH)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import LLMRequest
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
