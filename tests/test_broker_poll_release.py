"""Leases of a long-poll whose answer its poller never got are handed back on its report.

A poller names each `/pending` with a poll id (`poll=`); the broker records it with every
lease it grants to that long-poll, by a claim or by an enqueue's hand-off to a parked one.
The poller's next `/pending` reports the long-polls that got no whole answer
(`abandoned=`), and the broker hands back at once what they still hold, where that call's
own claim (or anyone's) takes it. Real Redis, real HTTP; leases of 600 s, so a request seen
again was handed back, never lapsed. Attacker probes: tests/security/test_poll_release.py;
a cut connection through a real proxy: tests/faults/test_pending_reply_lost.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from broker.store import Store
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer, InspectableBroker
from tests.test_broker_handoff import RECHECK_S, parked, until

pytestmark = pytest.mark.anyio

LEASE_S = 600.0


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerServer]) -> Callable[..., InspectableBroker]:
    def start(**overrides: Any) -> InspectableBroker:
        settings = {"lease_s": LEASE_S, "work_recheck_s": RECHECK_S, **overrides}
        return cast(InspectableBroker, broker_factory(InspectableBroker, **settings))

    return start


async def _poll(
    client: BrokerClient,
    poll_id: str,
    abandoned: list[str] | None = None,
    *,
    wait_s: float = 0,
    max_items: int = 8,
) -> list[p.PendingRequest]:
    batch = await client.pending(
        max_items=max_items, wait_s=wait_s, poll_id=poll_id, abandoned=abandoned or []
    )
    return batch.requests


async def test_every_request_of_a_lost_long_poll_comes_back_at_once(
    broker: Callable[..., InspectableBroker],
) -> None:
    server = broker()
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        prompts = ["one", "two", "three"]
        await session.client.enqueue_batch([p.LLMRequest(prompt=x) for x in prompts], wait_s=0)
        lost = await _poll(tenant.client, "lost-poll-000001", wait_s=5)
        assert len(lost) == 3
        again = await _poll(tenant.client, "next-poll-000001", ["lost-poll-000001"], wait_s=5)
    assert sorted(r.prompt or "" for r in again) == sorted(prompts)
    # Counted: a delivery whose answer was lost is a delivery (docs/protocol.md says why).
    assert {r.attempt for r in again} == {2}


async def test_a_lost_hand_off_comes_back_and_only_its_own_share(
    broker: Callable[..., InspectableBroker],
) -> None:
    """Two long-polls parked here are handed one request each by one enqueue script; the
    report of one of them hands back its own request, never the other's."""
    server = broker()
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        polls = [
            asyncio.create_task(
                _poll(tenant.client, f"parked-poll-{i:04d}", wait_s=30, max_items=1)
            )
            for i in range(2)
        ]
        await until(lambda: parked(server, tenant) == 2, "both long-polls park")
        await session.client.enqueue_batch(
            [p.LLMRequest(prompt="first"), p.LLMRequest(prompt="second")], wait_s=0
        )
        (first,), (second,) = await asyncio.gather(*polls)
        again = await _poll(tenant.client, "next-poll-000001", ["parked-poll-0001"], wait_s=5)
        assert [(r.id, r.attempt) for r in again] == [(second.id, 2)]
        # The other one's report hands back its own request, not the one re-delivered above.
        again = await _poll(tenant.client, "next-poll-000002", ["parked-poll-0000"], wait_s=5)
        assert [(r.id, r.attempt) for r in again] == [(first.id, 2)]


async def test_an_admin_report_hands_back_in_every_tenant_its_poll_leased_from(
    broker: Callable[..., InspectableBroker],
) -> None:
    server = broker()
    async with (
        tenant_and_session(server.url, server.admin_token, name="a") as (_, session_a),
        tenant_and_session(server.url, server.admin_token, name="b") as (_, session_b),
        BrokerClient(server.url, server.admin_token) as admin,
    ):
        await session_a.client.enqueue(p.LLMRequest(prompt="from a"), wait_s=0)
        await session_b.client.enqueue(p.LLMRequest(prompt="from b"), wait_s=0)
        lost = await _poll(admin, "admin-poll-00001", wait_s=5)
        assert len(lost) == 2
        again = await _poll(admin, "admin-poll-00002", ["admin-poll-00001"], wait_s=5)
    assert sorted(r.prompt or "" for r in again) == ["from a", "from b"]


async def test_a_request_whose_answers_are_always_lost_ends_undeliverable(
    broker: Callable[..., InspectableBroker],
) -> None:
    """A request whose delivery never reaches a poller (say, an answer too large for it)
    is not handed back forever: each lost delivery counts, up to RLM_MAX_ATTEMPTS."""
    server = broker(max_attempts=2)
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        result = await session.client.enqueue(p.LLMRequest(prompt="unreadable"), wait_s=0)
        (first,) = await _poll(tenant.client, "lost-poll-000001", wait_s=5)
        (second,) = await _poll(tenant.client, "lost-poll-000002", ["lost-poll-000001"], wait_s=5)
        assert (first.attempt, second.attempt) == (1, 2)
        assert await _poll(tenant.client, "lost-poll-000003", ["lost-poll-000002"]) == []
        final = await session.client.get_request(result.id, wait_s=5)
    assert final.status == "error" and final.error is not None
    assert final.error.code == "undeliverable"


async def test_a_poller_that_names_no_poll_is_served_as_before(
    broker: Callable[..., InspectableBroker],
) -> None:
    server = broker()
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        await session.client.enqueue(p.LLMRequest(prompt="plain"), wait_s=0)
        (request,) = (await tenant.client.pending(wait_s=5)).requests
        answered = await tenant.client.respond(p.Answer(id=request.id, response="ok"))
    assert answered.status == "accepted"


async def test_a_hand_back_of_several_leases_hands_back_every_one_uncounted(
    broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """`Store.release` (a long-poll that hung up before its answer): every request it held
    is deliverable again at once, its delivery not counted (nothing was sent)."""
    server = broker()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
            await session.client.enqueue_batch(
                [p.LLMRequest(prompt=x) for x in ("a", "b", "c")], wait_s=0
            )
            held = (await tenant.client.pending(max_items=8, wait_s=5)).requests
            store = Store(redis, server.settings, server.context.replica_id)
            released = await store.release(tenant.tenant_id, [r.id for r in held])
            again = (await tenant.client.pending(max_items=8, wait_s=5)).requests
    finally:
        await redis.aclose()
    assert released == ["released"] * 3
    assert sorted((r.id, r.attempt) for r in again) == sorted((r.id, 1) for r in held)
