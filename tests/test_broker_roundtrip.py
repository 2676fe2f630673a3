"""The whole round trip over real HTTP and a real Redis: enqueue, drain, respond, return."""

from __future__ import annotations

import asyncio

import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.run_info import RunInfo
from tests.support.brokers import running_poller, tenant_and_session
from tests.support.servers import BrokerProcess, BrokerServer

pytestmark = pytest.mark.anyio


async def test_enqueue_blocks_until_the_poller_answers(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        waiting = asyncio.create_task(
            session.client.enqueue(p.LLMRequest(prompt="2+2?", depth=1), wait_s=10)
        )
        batch = await tenant.client.pending(max_items=10, wait_s=5)
        assert not waiting.done()  # the call is still blocked while the request is leased
        (request,) = batch.requests
        assert request.prompt == "2+2?"
        assert request.depth == 1
        assert request.attempt == 1
        assert request.session_id == session.session_id
        assert request.tenant_id == tenant.tenant_id
        usage = p.Usage(input_tokens=5, output_tokens=1, cost_usd=0.001, calls=1)
        accepted = await tenant.client.respond(p.Answer(id=request.id, response="4", usage=usage))
        assert accepted.status == "accepted"
        result = await waiting
        assert (result.status, result.response, result.usage) == ("done", "4", usage)


async def test_messages_model_params_and_metadata_reach_the_poller(
    broker_server: BrokerServer,
) -> None:
    metadata = {"run_id": "r1", "max_depth": 2}
    async with tenant_and_session(
        broker_server.url, broker_server.admin_token, metadata=metadata
    ) as (tenant, session):
        request = p.LLMRequest(
            messages=[p.ChatMessage(role="user", content="hi")],
            model="small",
            params={"temperature": 0.2, "kind": "llm"},
            state={"seen": [1, 2]},
        )
        queued = await session.client.enqueue(request, wait_s=0)
        assert queued.status == "pending"
        (got,) = (await tenant.client.pending(wait_s=5)).requests
        assert got.messages == request.messages
        assert got.prompt is None
        assert (got.model, got.params, got.state, got.metadata) == (
            "small",
            {"temperature": 0.2, "kind": "llm"},
            {"seen": [1, 2]},
            RunInfo.model_validate(metadata),
        )


async def test_a_batch_returns_results_in_order(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        async with running_poller(tenant.client, reply=lambda r: (r.prompt or "").upper()):
            prompts = [f"item {i}" for i in range(20)]
            results = await session.client.enqueue_batch(
                [p.LLMRequest(prompt=x) for x in prompts], wait_s=10
            )
    assert [r.response for r in results.results] == [x.upper() for x in prompts]
    assert {r.status for r in results.results} == {"done"}


async def test_an_error_answer_reaches_the_caller_as_an_error(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        waiting = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="x"), wait_s=10))
        (request,) = (await tenant.client.pending(wait_s=5)).requests
        error = p.ErrorInfo(code="llm_rate_limited", message="provider said 429")
        await tenant.client.respond(p.Answer(id=request.id, error=error))
        result = await waiting
    assert result.status == "error"
    assert result.error == error
    assert result.response is None


async def test_wait_elapses_then_the_caller_waits_again(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        first = await session.client.enqueue(p.LLMRequest(prompt="slow"), wait_s=0.05)
        assert first.status == "pending"
        again = asyncio.create_task(session.client.get_request(first.id, wait_s=10))
        (request,) = (await tenant.client.pending(wait_s=5)).requests
        await tenant.client.respond(p.Answer(id=request.id, response="late"))
        result = await again
    assert (result.id, result.status, result.response) == (first.id, "done", "late")


async def test_an_answer_is_kept_when_nobody_waits(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        queued = await session.client.enqueue(p.LLMRequest(prompt="fire and forget"), wait_s=0)
        (request,) = (await tenant.client.pending(wait_s=5)).requests
        await tenant.client.respond(p.Answer(id=request.id, response="kept"))
        later = await session.client.get_request(queued.id, wait_s=0)
        by_tenant = await tenant.client.get_request(queued.id, wait_s=0)
    assert later.response == by_tenant.response == "kept"


async def test_first_answer_wins_and_duplicates_change_nothing(
    broker_server: BrokerServer,
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        queued = await session.client.enqueue(p.LLMRequest(prompt="q"), wait_s=0)
        await tenant.client.pending(wait_s=5)
        first = await tenant.client.respond(p.Answer(id=queued.id, response="first"))
        second = await tenant.client.respond(p.Answer(id=queued.id, response="second"))
        batch = await tenant.client.respond_batch(
            [
                p.Answer(id=queued.id, response="third"),
                p.Answer(id=f"{tenant.tenant_id}.{0:020d}", response="x"),
            ]
        )
        result = await session.client.get_request(queued.id, wait_s=0)
    assert (first.status, second.status) == ("accepted", "duplicate")
    assert [r.status for r in batch.results] == ["duplicate", "not_found"]
    assert result.response == "first"


async def test_pending_long_polls_until_work_arrives(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        empty = await tenant.client.pending(wait_s=0)
        assert empty.requests == []
        polling = asyncio.create_task(tenant.client.pending(wait_s=10))
        await asyncio.sleep(0.2)
        assert not polling.done()
        await session.client.enqueue(p.LLMRequest(prompt="wake up"), wait_s=0)
        batch = await polling
    assert [r.prompt for r in batch.requests] == ["wake up"]


async def test_round_trip_across_two_broker_processes(redis_url: str) -> None:
    """Enqueue on one `rlm broker` process, drain and respond on another: one Redis."""
    first, second = BrokerProcess(redis_url), BrokerProcess(redis_url)
    try:
        # Two independent processes: they start side by side (each until it answers /health);
        # both starts end before a failure is raised, so `finally` stops whatever started.
        for outcome in await asyncio.gather(
            asyncio.to_thread(first.start), asyncio.to_thread(second.start), return_exceptions=True
        ):
            if isinstance(outcome, BaseException):
                raise outcome
        async with tenant_and_session(first.url, first.admin_token) as (tenant, session):
            async with BrokerClient(second.url, tenant.token) as tenant_on_second:
                waiting = asyncio.create_task(
                    session.client.enqueue(p.LLMRequest(prompt="across"), wait_s=10)
                )
                (request,) = (await tenant_on_second.pending(wait_s=5)).requests
                await tenant_on_second.respond(p.Answer(id=request.id, response="from second"))
                result = await waiting
        assert result.response == "from second"
    finally:
        first.stop()
        second.stop()
