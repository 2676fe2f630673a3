"""Scopes and tenant isolation: every cross-scope attempt is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx2
import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceResponseError
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio


async def _status(call: asyncio.Future[object] | object) -> int:
    try:
        await call  # type: ignore[misc]
    except ServiceResponseError as exc:
        return exc.status
    return 200


async def test_each_scope_is_refused_outside_its_endpoints(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="a") as (tenant_a, session_a):
        async with tenant_and_session(url, admin_token, name="b") as (tenant_b, session_b):
            queued_a = await session_a.client.enqueue(p.LLMRequest(prompt="a"), wait_s=0)
            queued_b = await session_b.client.enqueue(p.LLMRequest(prompt="b"), wait_s=0)
            async with BrokerClient(url, tenant_a.token) as as_tenant_a:
                # a tenant token cannot enqueue, a session token cannot drain or answer
                assert await _status(as_tenant_a.enqueue(p.LLMRequest(prompt="x"))) == 403
            assert await _status(session_a.client.pending(wait_s=0)) == 403
            assert (
                await _status(session_a.client.respond(p.Answer(id=queued_a.id, response="x")))
                == 403
            )
            assert await _status(session_a.client.create_session()) == 403
            assert await _status(tenant_a.client.create_tenant("x")) == 403
            # another tenant's requests: not drained, not answerable, not readable
            drained = await tenant_a.client.pending(max_items=10, wait_s=0.2)
            assert [r.id for r in drained.requests] == [queued_a.id]
            answer_b = p.Answer(id=queued_b.id, response="from a")
            assert await _status(tenant_a.client.respond(answer_b)) == 403
            batch = await tenant_a.client.respond_batch([answer_b])
            assert [r.status for r in batch.results] == ["forbidden"]
            assert await _status(tenant_a.client.get_request(queued_b.id, wait_s=0)) == 403
            assert await _status(session_a.client.get_request(queued_b.id, wait_s=0)) == 403
            extended = await tenant_a.client.extend_leases([queued_b.id])
            assert [r.status for r in extended.results] == ["forbidden"]
            # another tenant's session cannot be deleted
            assert await _status(tenant_a.client.delete_session(session_b.session_id)) == 404
            # b's request is untouched
            (still_b,) = (await tenant_b.client.pending(wait_s=1)).requests
            assert still_b.id == queued_b.id


async def test_tenants_self_names_a_tenant_tokens_tenant_only(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="who") as (tenant, session):
        async with httpx2.AsyncClient(base_url=url) as http:

            async def whoami(token: str) -> httpx2.Response:
                headers = {"Authorization": f"Bearer {token}"}
                return await http.get("/tenants/self", headers=headers)

            mine = await whoami(tenant.token)
            assert mine.status_code == 200 and mine.json() == {"tenant_id": tenant.tenant_id}
            # The session token (sandboxed code holds it) and the admin token are no tenant.
            assert (await whoami(session.token)).status_code == 403
            assert (await whoami(admin_token)).status_code == 403
            assert (await whoami("rlm_t_made-up")).status_code == 401


async def test_a_session_reads_only_its_own_requests(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, one):
        other = await tenant.client.create_session()
        async with BrokerClient(broker_server.url, other.token) as other_client:
            queued = await one.client.enqueue(p.LLMRequest(prompt="mine"), wait_s=0)
            assert await _status(other_client.get_request(queued.id, wait_s=0)) == 403
            assert (await one.client.get_request(queued.id, wait_s=0)).status == "pending"
            assert (await tenant.client.get_request(queued.id, wait_s=0)).status == "pending"


async def test_admin_drains_and_answers_every_tenant(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="a") as (_, session_a):
        async with tenant_and_session(url, admin_token, name="b") as (_, session_b):
            await session_a.client.enqueue(p.LLMRequest(prompt="a"), wait_s=0)
            await session_b.client.enqueue(p.LLMRequest(prompt="b"), wait_s=0)
            async with BrokerClient(url, admin_token) as admin:
                batch = await admin.pending(max_items=10, wait_s=2)
                assert sorted(r.prompt or "" for r in batch.requests) == ["a", "b"]
                answers = [p.Answer(id=r.id, response="by admin") for r in batch.requests]
                results = await admin.respond_batch(answers)
    assert {r.status for r in results.results} == {"accepted"}


async def test_unknown_revoked_and_expired_tokens_get_401(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (
        tenant,
        session,
    ):
        waiting = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="q"), wait_s=10))
        await tenant.client.pending(wait_s=5)
        await tenant.client.delete_session(session.session_id)
        # the unanswered request fails at once, and the token is dead
        result = await waiting
        assert result.status == "error"
        assert result.error is not None and result.error.code == "session_closed"
        assert await _status(session.client.enqueue(p.LLMRequest(prompt="again"))) == 401

        short = await tenant.client.create_session(ttl_s=1)
        async with BrokerClient(broker_server.url, short.token) as short_client:
            assert (
                await short_client.enqueue(p.LLMRequest(prompt="ok"), wait_s=0)
            ).status == "pending"
            await asyncio.sleep(max(0.0, short.expires_at - time.time()) + 0.1)
            assert await _status(short_client.enqueue(p.LLMRequest(prompt="late"))) == 401

    async with BrokerClient(broker_server.url, "rlm_t_not-a-real-token") as unknown:
        assert await _status(unknown.pending(wait_s=0)) == 401
    async with httpx2.AsyncClient(base_url=broker_server.url) as raw:
        response = await raw.get("/pending")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_without_an_admin_token_no_tenant_can_be_made(
    broker_factory: Callable[..., BrokerServer],
) -> None:
    broker = broker_factory(admin_token=None)
    async with BrokerClient(broker.url, "anything") as client:
        assert await _status(client.create_tenant("x")) == 401


async def test_admin_opens_sessions_for_a_named_tenant_only(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="a") as (tenant_a, _):
        async with tenant_and_session(url, admin_token, name="b") as (tenant_b, _):
            async with BrokerClient(url, admin_token) as admin:
                opened = await admin.create_session(tenant_id=tenant_a.tenant_id)
                assert await _status(admin.create_session()) == 422
                assert await _status(admin.create_session(tenant_id="t_0000000000000000")) == 404
            assert (
                await _status(tenant_b.client.create_session(tenant_id=tenant_a.tenant_id)) == 403
            )
            async with BrokerClient(url, opened.token) as session_for_a:
                queued = await session_for_a.enqueue(p.LLMRequest(prompt="via admin"), wait_s=0)
            (request,) = (await tenant_a.client.pending(wait_s=2)).requests
            assert (request.id, request.tenant_id) == (queued.id, tenant_a.tenant_id)


async def test_admin_closes_a_named_tenants_session(broker_server: BrokerServer) -> None:
    url, admin_token = broker_server.url, broker_server.admin_token
    async with tenant_and_session(url, admin_token, name="a") as (tenant, session):
        async with BrokerClient(url, admin_token) as admin:
            assert await _status(admin.delete_session(session.session_id)) == 422
            other = "t_0000000000000000"
            assert await _status(admin.delete_session(session.session_id, tenant_id=other)) == 404
            await admin.delete_session(session.session_id, tenant_id=tenant.tenant_id)
        assert await _status(session.client.enqueue(p.LLMRequest(prompt="x"))) == 401
        assert (
            await _status(tenant.client.delete_session(session.session_id, tenant_id=other)) == 403
        )
