"""Key hygiene: every key of a request lives exactly as long as what it serves.

Results live RLM_RESULT_TTL_S; the request's watcher set and its Idempotency-Key go with them
(the key `RLM_IDEMPOTENCY_GRACE_S` later, so that a late replay is told `410 result_expired`
at once instead of waiting and then finding nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
import redis.asyncio as aioredis

from rlm_wire import broker_models as p
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer, wait_until

pytestmark = pytest.mark.anyio


async def _keys(redis_url: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return sorted([k.decode() async for k in client.scan_iter(count=1000)])
    finally:
        await client.aclose()


def _of_request(keys: list[str], request_id: str) -> list[str]:
    return [k for k in keys if request_id in k or ":idem:" in k]


async def test_after_the_result_ttl_no_key_of_the_request_remains(
    broker_factory: Callable[..., BrokerServer], redis_url: str
) -> None:
    broker = broker_factory(result_ttl_s=1, idempotency_grace_s=0)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        first = await session.client.enqueue(
            p.LLMRequest(prompt="q"), wait_s=0, idempotency_key="k-1"
        )
        assert _of_request(await _keys(redis_url), first.id)
        (delivered,) = (await tenant.client.pending(wait_s=5)).requests
        await tenant.client.respond(p.Answer(id=delivered.id, response="a"))
        # Re-waiting on the answered request (twice) must not leave a watcher behind.
        assert (await session.client.get_request(first.id, wait_s=5)).response == "a"
        assert (await session.client.get_request(first.id, wait_s=5)).response == "a"
        assert not [k for k in await _keys(redis_url) if k.endswith(":w")]

        async def gone() -> bool:
            return not _of_request(await _keys(redis_url), first.id)

        await wait_until(gone, timeout_s=15, interval_s=0.2)


async def test_a_replay_after_the_result_expired_is_refused_at_once(
    broker_factory: Callable[..., BrokerServer], redis_url: str
) -> None:
    broker = broker_factory(result_ttl_s=1, idempotency_grace_s=60, max_wait_s=600)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        first = await session.client.enqueue(
            p.LLMRequest(prompt="q"), wait_s=0, idempotency_key="late"
        )
        (delivered,) = (await tenant.client.pending(wait_s=5)).requests
        await tenant.client.respond(p.Answer(id=delivered.id, response="a"))

        async def result_gone() -> bool:
            return not [k for k in await _keys(redis_url) if first.id in k]

        await wait_until(result_gone, timeout_s=15, interval_s=0.2)
        # The old code waited the whole `wait` (here 500 s, past this client's 20 s
        # timeout) and then answered 202 pending: a replay must be answered now.
        async with httpx2.AsyncClient(base_url=broker.url, timeout=20) as raw:
            response = await raw.post(
                "/enqueue",
                params={"wait": 500},
                json={"prompt": "q"},
                headers={"Authorization": f"Bearer {session.token}", "Idempotency-Key": "late"},
            )
        assert response.status_code == 410, response.text
        assert response.json()["error"]["code"] == "result_expired"
        # Nothing was enqueued again: the replay paid for nothing.
        assert (await tenant.client.pending(wait_s=0)).requests == []


async def test_an_idempotency_key_lives_while_a_batch_member_is_unanswered(
    broker_factory: Callable[..., BrokerServer],
) -> None:
    broker = broker_factory(result_ttl_s=1, idempotency_grace_s=0)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        batch = [p.LLMRequest(prompt="a"), p.LLMRequest(prompt="b")]
        first = await session.client.enqueue_batch(batch, wait_s=0, idempotency_key="b")
        a, b = (await tenant.client.pending(max_items=2, wait_s=5)).requests
        await tenant.client.respond(p.Answer(id=a.id, response="A"))
        # b is still unanswered: a retry well past a's result TTL must not enqueue twice...
        await wait_until(
            lambda: _result_expired(broker.url, session.token, a.id), timeout_s=15, interval_s=0.2
        )
        async with httpx2.AsyncClient(base_url=broker.url, timeout=20) as raw:
            replay = await raw.post(
                "/enqueue",
                params={"wait": 0},
                json={"batch": [{"prompt": "a"}, {"prompt": "b"}]},
                headers={"Authorization": f"Bearer {session.token}", "Idempotency-Key": "b"},
            )
        # ...it is told that a's result is gone, and b stays the one request in flight.
        assert replay.status_code == 410, replay.text
        assert [r.id for r in first.results] == [a.id, b.id]


async def _result_expired(url: str, token: str, request_id: str) -> bool:
    async with httpx2.AsyncClient(base_url=url) as raw:
        response = await raw.get(
            f"/requests/{request_id}",
            params={"wait": 0},
            headers={"Authorization": f"Bearer {token}"},
        )
    return response.status_code == 404
