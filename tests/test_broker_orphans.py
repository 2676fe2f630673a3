"""Orphans: the requests of a closed or expired session are never paid for.

Closing a session fails its queued requests (`session_closed`, waiters told at once) and no
poller is handed them; one already leased is flagged (`not_leased` on /leases/extend, and
`duplicate` on /respond: it already has its final result). A session that expired fails its
requests with `session_expired` instead of delivering them.
"""

from __future__ import annotations

import asyncio
import time

import httpx2
import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer, wait_until

pytestmark = pytest.mark.anyio


async def test_closing_a_session_cancels_its_queued_and_leased_requests(
    broker_server: BrokerServer,
) -> None:
    url = broker_server.url
    async with tenant_and_session(url, broker_server.admin_token) as (tenant, session):
        waiting = asyncio.create_task(
            session.client.enqueue_batch(
                [p.LLMRequest(prompt=f"q{i}") for i in range(4)], wait_s=30
            )
        )
        (leased,) = (await tenant.client.pending(max_items=1, wait_s=5)).requests
        closed = await _close(url, tenant.token, session.session_id)
        assert closed.failed_requests == 4

        results = (await waiting).results
        assert {r.status for r in results} == {"error"}
        assert {r.error.code for r in results if r.error} == {"session_closed"}
        # The three queued ones are never handed out, the leased one is flagged.
        assert (await tenant.client.pending(max_items=10, wait_s=0.5)).requests == []
        assert (await tenant.client.extend_leases([leased.id])).results[0].status == "not_leased"
        answer = await tenant.client.respond(p.Answer(id=leased.id, response="late"))
        assert answer.status == "duplicate"
        assert (await tenant.client.get_request(leased.id, wait_s=0)).error is not None


async def test_requests_of_an_expired_session_are_not_delivered(
    broker_server: BrokerServer,
) -> None:
    url = broker_server.url
    async with tenant_and_session(url, broker_server.admin_token) as (tenant, _):
        short = await tenant.client.create_session(ttl_s=1)
        async with BrokerClient(url, short.token) as sandbox:
            first = await sandbox.enqueue(p.LLMRequest(prompt="leased"), wait_s=0)
            second = await sandbox.enqueue(p.LLMRequest(prompt="queued"), wait_s=0)
        (leased,) = (await tenant.client.pending(max_items=1, wait_s=5)).requests
        assert leased.id == first.id

        await wait_until(lambda: time.time() > short.expires_at + 0.05, timeout_s=10)
        # Past the session's end the queued one is not handed out, and the poller still
        # holding the other one's lease is told to stop.
        assert (await tenant.client.pending(max_items=10, wait_s=0.5)).requests == []
        extended = await tenant.client.extend_leases([first.id])
        assert extended.results[0].status == "not_leased"
        for request_id in (first.id, second.id):
            result = await tenant.client.get_request(request_id, wait_s=0)
            assert result.error is not None and result.error.code == "session_expired"


async def _close(url: str, token: str, session_id: str) -> p.SessionClosed:
    async with httpx2.AsyncClient(base_url=url) as raw:
        response = await raw.delete(
            f"/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"}
        )
    response.raise_for_status()
    return p.SessionClosed.model_validate(response.json())
