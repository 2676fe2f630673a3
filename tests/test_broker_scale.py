"""Waiting costs no Redis connection; admin draining is fair; /health and /metrics report."""

from __future__ import annotations

import asyncio
import contextlib

import httpx2
import pytest
import redis.asyncio as aioredis

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import running_poller, tenant_and_session
from tests.support.servers import BrokerProcess, BrokerServer, wait_until

pytestmark = pytest.mark.anyio

WAITERS = 1000
POOLS = 10


async def test_a_thousand_waiting_enqueues_hold_a_bounded_number_of_connections(
    redis_url: str,
) -> None:
    broker = BrokerProcess(redis_url, RLM_REDIS_MAX_CONNECTIONS="16")
    broker.start()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with (
            tenant_and_session(broker.url, broker.admin_token) as (tenant, session),
            contextlib.AsyncExitStack() as stack,
        ):
            # The waiters' connections are spread over a few clients: one HTTP pool scans all
            # its connections for every request (quadratic in the pool size), which cost this
            # test more time than the broker did. The broker sees the same 1000 connections.
            pools = [
                await stack.enter_async_context(
                    BrokerClient(
                        broker.url,
                        session.token,
                        max_connections=WAITERS // POOLS + 10,
                        timeout_s=60,
                    )
                )
                for _ in range(POOLS)
            ]
            calls = [
                asyncio.create_task(
                    pools[i % POOLS].enqueue(p.LLMRequest(prompt=f"{i}"), wait_s=60)
                )
                for i in range(WAITERS)
            ]

            async def all_waiting() -> bool:
                health = (await tenant.client.health())["queues"]
                return bool(health["pending"] == WAITERS)

            await wait_until(all_waiting, timeout_s=60, interval_s=0.2)
            async with BrokerClient(broker.url, None) as anonymous:
                assert (await anonymous.health())["waiters"] == WAITERS
            clients = await redis.client_list()
            # the test's own connection, the broker's pool (<= 16) and its subscription
            assert len(clients) <= 16 + 2, [c.get("name") for c in clients]
            assert not any(c.done() for c in calls)
            async with running_poller(tenant.client, reply=lambda r: f"a{r.prompt}"):
                results = await asyncio.gather(*calls)
        assert [r.response for r in results] == [f"a{i}" for i in range(WAITERS)]
    finally:
        await redis.aclose()
        broker.stop()


async def test_admin_draining_is_fair_between_tenants(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="busy") as (busy, busy_session):
        async with tenant_and_session(url, admin_token, name="quiet") as (quiet, quiet_session):
            await busy_session.client.enqueue_batch(
                [p.LLMRequest(prompt="busy") for _ in range(200)], wait_s=0
            )
            await quiet_session.client.enqueue_batch(
                [p.LLMRequest(prompt="quiet") for _ in range(3)], wait_s=0
            )
            async with BrokerClient(url, admin_token) as admin:
                first = await admin.pending(max_items=10, wait_s=1)
    tenants = [r.tenant_id for r in first.requests]
    assert len(tenants) == 10
    assert tenants.count(quiet.tenant_id) == 3  # all of the quiet tenant's work, at once
    assert tenants.count(busy.tenant_id) == 7


async def test_health_and_metrics_report_queues_and_pollers(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        for i in range(3):
            await session.client.enqueue(p.LLMRequest(prompt=f"{i}"), wait_s=0)
        await tenant.client.pending(max_items=1, wait_s=1)
        await asyncio.sleep(0.05)
        health = await tenant.client.health()
        async with running_poller(tenant.client):
            result = await session.client.enqueue(p.LLMRequest(prompt="timed"), wait_s=10)
        assert result.status == "done"
        async with httpx2.AsyncClient(base_url=broker_server.url) as raw:
            metrics = (await raw.get("/metrics")).text
    assert health["status"] == "ok"
    assert health["queues"]["pending"] == 2
    assert health["queues"]["leased"] == 1
    assert health["queues"]["oldest_pending_age_s"] > 0
    assert health["pollers_last_minute"] == 1
    assert health["redis"]["reachable"] is True
    assert health["redis"]["rtt_ms"] >= 0
    assert 'rlm_broker_http_requests_total{endpoint="enqueue",status="200"} 1.0' in metrics
    # the poller answered the two unleased requests and the timed one (one stays leased)
    assert "rlm_broker_enqueue_to_respond_seconds_count 3.0" in metrics
    assert "rlm_broker_queue_pending 0.0" in metrics
    assert "rlm_broker_queue_leased 1.0" in metrics
