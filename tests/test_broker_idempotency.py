"""`Idempotency-Key` on /enqueue: a retried POST never enqueues (or costs) twice."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceResponseError
from tests.support.brokers import running_poller, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio


async def test_a_repeated_key_gets_the_first_requests_back(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        request = p.LLMRequest(prompt="once")
        first = await session.client.enqueue(request, wait_s=0, idempotency_key="call-1")
        again = await session.client.enqueue(request, wait_s=0, idempotency_key="call-1")
        other = await session.client.enqueue(request, wait_s=0, idempotency_key="call-2")
        delivered = (await tenant.client.pending(max_items=10, wait_s=1)).requests
        assert again.id == first.id
        assert sorted(r.id for r in delivered) == sorted({first.id, other.id})
        await tenant.client.respond(p.Answer(id=first.id, response="answered once"))
        # A retry after the answer gets the answer at once.
        late = await session.client.enqueue(request, wait_s=5, idempotency_key="call-1")
    assert (late.id, late.status, late.response) == (first.id, "done", "answered once")


async def test_a_retry_waits_for_the_same_answer(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        batch = [p.LLMRequest(prompt=f"item {i}") for i in range(3)]
        first = await session.client.enqueue_batch(batch, wait_s=0, idempotency_key="b")
        # The caller lost the first answer (say, a dropped connection) and posts again.
        retry = asyncio.create_task(
            session.client.enqueue_batch(batch, wait_s=10, idempotency_key="b")
        )
        async with running_poller(tenant.client, reply=lambda r: (r.prompt or "").upper()):
            results = (await retry).results
    assert [r.id for r in results] == [r.id for r in first.results]
    assert [r.response for r in results] == ["ITEM 0", "ITEM 1", "ITEM 2"]


async def test_keys_belong_to_one_session(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, one):
        other = await tenant.client.create_session()
        async with BrokerClient(broker_server.url, other.token) as other_client:
            a = await one.client.enqueue(p.LLMRequest(prompt="a"), wait_s=0, idempotency_key="k")
            b = await other_client.enqueue(p.LLMRequest(prompt="b"), wait_s=0, idempotency_key="k")
    assert a.id != b.id


async def test_a_reused_key_with_another_batch_size_or_a_bad_key_is_refused(
    broker_server: BrokerServer,
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (_, session):
        await session.client.enqueue(p.LLMRequest(prompt="x"), wait_s=0, idempotency_key="k")
        with pytest.raises(ServiceResponseError) as caught:
            await session.client.enqueue_batch(
                [p.LLMRequest(prompt="x")] * 2, wait_s=0, idempotency_key="k"
            )
        assert caught.value.status == 422
        async with httpx2.AsyncClient(base_url=broker_server.url) as raw:
            for bad in ("", "x" * 201, "tab\there"):
                response = await raw.post(
                    "/enqueue",
                    json={"prompt": "x"},
                    headers={"Authorization": f"Bearer {session.token}", "Idempotency-Key": bad},
                )
                assert response.status_code == 400, bad
                assert response.json()["error"]["code"] == "bad_request"
