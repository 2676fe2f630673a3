"""The enqueue script leases new work straight to a long-poll parked on the same replica.

One script instead of enqueue + the woken long-poll's claim (`broker.parking`). Each
batch reserves its long-polls before its script is sent, so no second batch counts them;
a long-poll that hangs up while its hand-off runs loses nothing (the lease is handed back at
once and the next poller takes it); work not handed off is announced as before, to this
replica's long-polls and to the other replicas'. Real Redis, real HTTP.

`CLIENT PAUSE ... WRITE` holds every script in Redis for a moment, so that a hand-off is
caught in flight without timing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import Tenant, tenant_and_session
from tests.support.servers import BrokerServer, InspectableBroker

pytestmark = pytest.mark.anyio

#: No periodic re-claim falls inside a test: only the hand-off (or a wake-up) moves work.
RECHECK_S = 30.0
LONG_POLL_S = 60.0
#: Longer than any test waits with writes paused; each test unpauses as soon as it may.
PAUSE_MS = 20_000


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerServer]) -> Callable[..., InspectableBroker]:
    def start(**overrides: Any) -> InspectableBroker:
        settings = {"work_recheck_s": RECHECK_S, "redis_timeout_s": 30.0, **overrides}
        return cast(InspectableBroker, broker_factory(InspectableBroker, **settings))

    return start


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.client_unpause()
        await client.aclose()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def parked(broker: InspectableBroker, tenant: Tenant) -> int:
    return broker.context.parking.parked(tenant.tenant_id)


def parked_is(broker: InspectableBroker, tenant: Tenant, count: int) -> bool:
    return parked(broker, tenant) == count


async def commands(redis: aioredis.Redis, *names: str) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


def unique_prefix() -> str:
    """A key prefix of the test's own: no other broker listens on its work channel."""
    return f"handoff-{uuid.uuid4().hex}"


async def test_an_enqueue_hands_its_request_to_the_parked_long_poll_in_one_script(
    broker: Callable[..., InspectableBroker], redis: aioredis.Redis
) -> None:
    server = broker(key_prefix=unique_prefix())
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        poll = asyncio.create_task(tenant.client.pending(wait_s=LONG_POLL_S))
        await until(lambda: parked(server, tenant) == 1, "the long-poll parks")
        await redis.script_load(server.context.store.scripts.enqueue.source)  # no NOSCRIPT
        before = await commands(redis, "evalsha", "eval")
        waiting = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="2+2?")))
        (request,) = (await poll).requests
        scripts = await commands(redis, "evalsha", "eval") - before
        leased = await redis.xpending(server.context.store.keys.stream(tenant.tenant_id), "pollers")
        await tenant.client.respond(p.Answer(id=request.id, response="4"))
        assert (await waiting).response == "4"
    assert scripts == 1  # the enqueue alone: no claim by the long-poll
    assert request.attempt == 1 and request.prompt == "2+2?"
    assert leased["pending"] == 1  # leased (in the group's pending list), not just read


async def test_a_long_poll_that_hangs_up_during_its_hand_off_loses_nothing(
    broker: Callable[..., InspectableBroker], redis: aioredis.Redis
) -> None:
    server = broker(key_prefix=unique_prefix())
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        url = urlsplit(server.url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(
            f"GET /pending?max=1&wait={LONG_POLL_S} HTTP/1.1\r\nHost: broker\r\n"
            f"Authorization: Bearer {tenant.token}\r\n\r\n".encode()
        )
        await writer.drain()
        await until(lambda: parked(server, tenant) == 1, "the long-poll parks")
        xclaims = await commands(redis, "xclaim")
        await redis.client_pause(PAUSE_MS, all=False)  # writes (and scripts) wait
        waiting = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="kept")))
        await until(lambda: parked(server, tenant) == 0, "the enqueue reserves the long-poll")
        writer.close()  # the poller goes away while the script that leases for it is held
        parking = server.context.parking
        await until(lambda: parking.waiting(tenant.tenant_id) == 0, "the broker notices")
        await redis.client_unpause()
        # The next poller takes it at once (no lease expiry, no periodic re-claim).
        batch = await tenant.client.pending(max_items=1, wait_s=LONG_POLL_S)
        (request,) = batch.requests
        await tenant.client.respond(p.Answer(id=request.id, response="delivered"))
        result = await waiting
        handed_back = await commands(redis, "xclaim") - xclaims
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert await reader.read() == b""  # nothing was ever sent to the one who left
    assert result.response == "delivered"
    assert request.prompt == "kept"
    assert request.attempt == 1  # the hand-off that never reached anyone is not counted
    assert handed_back == 1  # leased by the hand-off, then released (release.lua's XCLAIM)


async def answer_until_done(
    client: BrokerClient, enqueues: Sequence[asyncio.Future[Any]], seen: list[str]
) -> None:
    """A poller: answers what it is given (noting each delivery) until every enqueue is back."""
    while not all(task.done() for task in enqueues):
        batch = await client.pending(max_items=4, wait_s=0.5)
        if batch.requests:
            seen.extend(r.id for r in batch.requests)
            assert all(r.attempt == 1 for r in batch.requests)
            answers = [p.Answer(id=r.id, response=f"re:{r.prompt}") for r in batch.requests]
            await client.respond_batch(answers)


async def parked_polls(tenant: Tenant, count: int) -> list[asyncio.Task[p.PendingBatch]]:
    return [
        asyncio.create_task(tenant.client.pending(max_items=1, wait_s=LONG_POLL_S))
        for _ in range(count)
    ]


async def test_batches_in_flight_at_once_never_share_a_long_poll(
    broker: Callable[..., InspectableBroker], redis: aioredis.Redis
) -> None:
    """Three parked long-polls of one request each and five enqueue batches held in Redis at
    once: each request is delivered exactly once, none is lost, all are answered."""
    server = broker(key_prefix=unique_prefix())
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        polls = await parked_polls(tenant, 3)
        await until(lambda: parked(server, tenant) == 3, "three long-polls park")
        await redis.client_pause(PAUSE_MS, all=False)  # writes (and scripts) wait
        enqueues: list[asyncio.Task[p.RequestResult]] = []
        waiters = server.context.waiters
        for i in range(5):  # a batch each: the ones before are held in Redis
            enqueues.append(
                asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt=f"q{i}")))
            )
            await until(lambda: len(waiters) == len(enqueues), "the enqueue reaches its batch")
            left = max(0, 3 - len(enqueues))  # the first three reserve one long-poll each
            await until(functools.partial(parked_is, server, tenant, left), "the batch reserves")
        await redis.client_unpause()
        seen: list[str] = []
        for poll in polls:
            batch = await poll
            for request in batch.requests:
                seen.append(request.id)
                assert request.attempt == 1
                await tenant.client.respond(
                    p.Answer(id=request.id, response=f"re:{request.prompt}")
                )
        await answer_until_done(tenant.client, enqueues, seen)
        results = [await task for task in enqueues]
    assert [r.response for r in results] == [f"re:q{i}" for i in range(5)]
    assert sorted(seen) == sorted(r.id for r in results)  # each delivered once


async def test_many_concurrent_enqueues_with_few_long_polls_all_complete(
    broker: Callable[..., InspectableBroker],
) -> None:
    """c=64-like: 64 callers in loops, two pollers of small batches; every request is
    answered, each delivered once."""
    server = broker(key_prefix=unique_prefix(), work_recheck_s=1.0)
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        seen: list[str] = []
        answered: list[str] = []

        async def caller(n: int) -> None:
            for round_ in range(5):
                result = await session.client.enqueue(p.LLMRequest(prompt=f"{n}.{round_}"))
                assert result.status == "done" and result.response == f"re:{n}.{round_}"
                answered.append(result.id)

        callers = [asyncio.create_task(caller(n)) for n in range(64)]
        async with BrokerClient(server.url, tenant.token) as second:
            await asyncio.gather(
                answer_until_done(tenant.client, callers, seen),
                answer_until_done(second, callers, seen),
                *callers,
            )
    assert len(answered) == 64 * 5
    assert sorted(seen) == sorted(answered)


async def test_work_not_handed_off_reaches_a_long_poll_on_another_replica(
    broker: Callable[..., InspectableBroker],
) -> None:
    """Replica A holds one long-poll of one request, replica B another: two requests
    enqueued on A go one to each (A's by hand-off, B's announced through Redis); a
    request enqueued on B, whose replica has no long-poll parked, reaches A's."""
    prefix = unique_prefix()
    first, second = broker(key_prefix=prefix), broker(key_prefix=prefix)
    async with (
        tenant_and_session(first.url, first.admin_token) as (tenant, session),
        BrokerClient(second.url, tenant.token) as on_second,
        BrokerClient(second.url, session.token) as session_on_second,
    ):
        here = asyncio.create_task(tenant.client.pending(max_items=1, wait_s=LONG_POLL_S))
        there = asyncio.create_task(on_second.pending(max_items=1, wait_s=LONG_POLL_S))
        await until(lambda: parked(first, tenant) == 1, "a long-poll parks on A")
        await until(lambda: parked(second, tenant) == 1, "a long-poll parks on B")
        waiting = asyncio.create_task(
            session.client.enqueue_batch([p.LLMRequest(prompt="a"), p.LLMRequest(prompt="b")])
        )
        (mine,) = (await here).requests
        (theirs,) = (await there).requests
        await tenant.client.respond_batch(
            [p.Answer(id=r.id, response=r.prompt or "") for r in (mine, theirs)]
        )
        results = (await waiting).results

        here = asyncio.create_task(tenant.client.pending(max_items=1, wait_s=LONG_POLL_S))
        await until(lambda: parked(first, tenant) == 1, "a long-poll parks on A again")
        from_b = asyncio.create_task(session_on_second.enqueue(p.LLMRequest(prompt="c")))
        (crossed,) = (await here).requests
        await on_second.respond(p.Answer(id=crossed.id, response="crossed"))
        assert (await from_b).response == "crossed"
    assert sorted(r.response or "" for r in results) == ["a", "b"]
    assert {mine.prompt, theirs.prompt} == {"a", "b"}
    assert mine.attempt == theirs.attempt == crossed.attempt == 1


async def test_a_hand_off_gives_no_more_than_the_long_poll_asked_for(
    broker: Callable[..., InspectableBroker],
) -> None:
    """A batch of three to a long-poll of `max=2`: it gets two, the third is announced and
    taken by the next long-poll."""
    server = broker(key_prefix=unique_prefix())
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        poll = asyncio.create_task(tenant.client.pending(max_items=2, wait_s=LONG_POLL_S))
        await until(lambda: parked(server, tenant) == 1, "the long-poll parks")
        prompts = [p.LLMRequest(prompt=x) for x in ("x", "y", "z")]
        waiting = asyncio.create_task(session.client.enqueue_batch(prompts))
        first = (await poll).requests
        rest = (await tenant.client.pending(max_items=2, wait_s=LONG_POLL_S)).requests
        await tenant.client.respond_batch(
            [p.Answer(id=r.id, response=r.prompt or "") for r in first + rest]
        )
        results = (await waiting).results
    assert [len(first), len(rest)] == [2, 1]
    assert [r.response for r in results] == ["x", "y", "z"]


async def test_a_hand_off_also_delivers_an_expired_lease_again(
    broker: Callable[..., InspectableBroker], redis: aioredis.Redis
) -> None:
    """When every long-poll is served by hand-offs (no claim script runs), a lease that
    expired is still delivered again: the hand-off leases as a claim does, expired first."""
    server = broker(key_prefix=unique_prefix(), lease_s=0.5)
    async with tenant_and_session(server.url, server.admin_token) as (tenant, session):
        forgotten = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="lost")))
        (taken,) = (await tenant.client.pending(max_items=2, wait_s=LONG_POLL_S)).requests
        stream = server.context.store.keys.stream(tenant.tenant_id)

        async def expired() -> bool:
            (lease,) = await redis.xpending_range(stream, "pollers", "-", "+", 1)
            return int(lease["time_since_delivered"]) > 500

        for _ in range(3000):
            if await expired():
                break
            await asyncio.sleep(0.01)
        poll = asyncio.create_task(tenant.client.pending(max_items=2, wait_s=LONG_POLL_S))
        await until(lambda: parked(server, tenant) == 1, "the long-poll parks")
        fresh = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="new")))
        handed = (await poll).requests
        await tenant.client.respond_batch(
            [p.Answer(id=r.id, response=r.prompt or "") for r in handed]
        )
        results = [await forgotten, await fresh]
    assert [(r.prompt, r.attempt) for r in handed] == [("lost", 2), ("new", 1)]
    assert taken.id == handed[0].id
    assert [r.response for r in results] == ["lost", "new"]
