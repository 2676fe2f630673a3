"""What one llm_query round trip costs the broker in Redis, counted on the real server.

A round trip is enqueue -> a long-poll takes it -> respond -> the enqueue returns, and the
poller's next long-poll starts. `INFO commandstats` counts the scripts it ran: enqueue (which
leases the request to the parked long-poll, `broker.parking`) and the answer; no empty claim
when the next long-poll starts, since nothing was announced after the queue was emptied.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from broker.settings import BrokerSettings
from broker.store import Store
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ApiError
from tests.support.brokers import Session, Tenant, tenant_and_session
from tests.support.servers import BrokerServer, InspectableBroker

pytestmark = pytest.mark.anyio

#: Long enough that no periodic re-claim of a waiting long-poll falls inside the test.
RECHECK_S = 30.0
LONG_POLL_S = 60.0


@pytest.fixture
def inspectable_broker(
    broker_factory: Callable[..., BrokerServer],
) -> Callable[..., InspectableBroker]:
    def start(**overrides: Any) -> InspectableBroker:
        return cast(InspectableBroker, broker_factory(InspectableBroker, **overrides))

    return start


async def command_calls(redis: aioredis.Redis, *names: str) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


async def script_calls(redis: aioredis.Redis) -> int:
    return await command_calls(redis, "evalsha", "eval")


async def long_poll_parked(broker: InspectableBroker, tenant_id: str) -> None:
    """Until the broker holds a long-poll of the tenant waiting for work (its claim, or
    its decision to skip one, is behind it)."""
    parking = broker.context.parking
    for _ in range(3000):
        if parking.waiting(tenant_id):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the long-poll never started waiting")


async def one_round_trip(
    broker: InspectableBroker, tenant: Tenant, session: Session, poll: asyncio.Task[p.PendingBatch]
) -> asyncio.Task[p.PendingBatch]:
    """Enqueue, take it from the waiting long-poll `poll`, answer; returns the next long-poll,
    started as a poller does right after a batch, and parked."""
    waiting = asyncio.create_task(session.client.enqueue(p.LLMRequest(prompt="2+2?"), wait_s=30))
    (request,) = (await poll).requests
    next_poll = asyncio.create_task(tenant.client.pending(wait_s=LONG_POLL_S))
    await tenant.client.respond(p.Answer(id=request.id, response="4"))
    assert (await waiting).response == "4"
    await long_poll_parked(broker, tenant.tenant_id)
    return next_poll


async def test_a_round_trip_runs_three_scripts_and_no_empty_claim(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    # Its own key prefix: no other test's broker listens on its work channel.
    broker = inspectable_broker(work_recheck_s=RECHECK_S, key_prefix=f"alone-{uuid.uuid4().hex}")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            poll = asyncio.create_task(tenant.client.pending(wait_s=LONG_POLL_S))
            await long_poll_parked(broker, tenant.tenant_id)
            poll = await one_round_trip(broker, tenant, session, poll)  # warm up
            before = await script_calls(redis), await command_calls(redis, "publish")
            rounds = 5
            for _ in range(rounds):
                poll = await one_round_trip(broker, tenant, session, poll)
            calls = await script_calls(redis) - before[0]
            publishes = await command_calls(redis, "publish") - before[1]
            poll.cancel()
    finally:
        await redis.aclose()
    # enqueue (which leases the request straight to the parked long-poll) + the answer; 3
    # before the hand-off (a claim by the woken long-poll), 4 before that (an empty claim
    # each time a long-poll started).
    assert calls == 2 * rounds
    # A lone replica announces no work (it wakes its own long-polls) and pushes no answer
    # (it resolves its own waiters): the old one published each request's announcement.
    assert publishes == 0


async def test_a_round_trip_keeps_no_watchers_set_and_reads_no_body_length(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """The enqueuing replica is named in the request hash (`origin`), not in a watchers set
    made and read for every request, and the body's size is stored with it: 33 commands
    ran inside the scripts of a round trip before, 26 now (INFO commandstats)."""
    broker = inspectable_broker(work_recheck_s=RECHECK_S, key_prefix=f"alone-{uuid.uuid4().hex}")
    redis = aioredis.Redis.from_url(redis_url)
    watched = ("smembers", "sadd", "del", "hstrlen")
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            poll = asyncio.create_task(tenant.client.pending(wait_s=LONG_POLL_S))
            await long_poll_parked(broker, tenant.tenant_id)
            poll = await one_round_trip(broker, tenant, session, poll)  # warm up
            before = [await command_calls(redis, name) for name in watched]
            rounds = 5
            for _ in range(rounds):
                poll = await one_round_trip(broker, tenant, session, poll)
            after = [await command_calls(redis, name) for name in watched]
            poll.cancel()
    finally:
        await redis.aclose()
    calls = dict(zip(watched, [b - a for a, b in zip(before, after, strict=True)], strict=True))
    # One SADD per round trip remains: the request joins its session's open set.
    assert calls == {"smembers": 0, "sadd": rounds, "del": 0, "hstrlen": 0}


async def test_an_answer_reaches_a_request_stored_with_only_a_watchers_set(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """A request stored by the broker before `origin` (a rolling upgrade) named its enqueuing
    replica in its watchers set only: an answer taken on another replica still reaches it."""
    first, second = inspectable_broker(), inspectable_broker()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with tenant_and_session(first.url, first.admin_token) as (tenant, session):
            async with BrokerClient(second.url, tenant.token) as on_second:
                waiting = asyncio.create_task(
                    session.client.enqueue(p.LLMRequest(prompt="old"), wait_s=30)
                )
                (request,) = (await on_second.pending(wait_s=10)).requests
                req = f"rlm:{{{tenant.tenant_id}}}:req:{request.id}"
                # As the old enqueue.lua stored it.
                await redis.hdel(req, "origin", "size")
                await redis.sadd(f"{req}:w", first.context.replica_id)
                await on_second.respond(p.Answer(id=request.id, response="still here"))
                assert (await waiting).response == "still here"
                assert not await redis.exists(f"{req}:w")
    finally:
        await redis.aclose()


async def test_a_long_poll_that_skipped_its_claim_still_finds_unannounced_work(
    broker_factory: Callable[..., BrokerServer],
) -> None:
    """A lease that lapses is delivered again with no announcement: the periodic re-claim of
    a long-poll that began without a claim still finds it."""
    broker = broker_factory(work_recheck_s=0.2, lease_s=0.5)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        await session.client.enqueue(p.LLMRequest(prompt="lost"), wait_s=0)
        (first,) = (await tenant.client.pending(wait_s=5)).requests  # leased, never answered
        # The queue is drained now: this long-poll starts without a claim, then re-claims.
        (again,) = (await tenant.client.pending(wait_s=10)).requests
    assert (again.id, again.attempt) == (first.id, 2)


async def test_a_short_poll_after_an_enqueue_on_another_replica_finds_it(
    broker_factory: Callable[..., BrokerServer],
) -> None:
    """Every /pending claims at least once: a request enqueued on another replica, whose
    announcement may still be on its way, is there for a poll of any wait."""
    first, second = broker_factory(), broker_factory()
    async with tenant_and_session(first.url, first.admin_token) as (tenant, session):
        async with BrokerClient(second.url, tenant.token) as on_second:
            assert (await on_second.pending(wait_s=0)).requests == []  # drains: a mark
            for round_ in range(3):
                queued = await session.client.enqueue(p.LLMRequest(prompt=f"{round_}"), wait_s=0)
                (got,) = (await on_second.pending(wait_s=0)).requests
                assert got.id == queued.id


async def replies_until_marker(pubsub: PubSub, marker: str) -> list[tuple[str, bytes]]:
    """(channel, data) of every reply message published before `marker`'s."""
    seen: list[tuple[str, bytes]] = []
    for _ in range(600):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is None:
            continue
        channel = message["channel"].decode()
        if channel == marker:
            return seen
        seen.append((channel, message["data"]))
    raise AssertionError("the marker never arrived")


async def test_an_answer_is_pushed_to_other_replicas_only(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """The replica that takes an answer wakes its own waiters without a pub/sub message to
    itself; a waiter on another replica still gets it through that replica's channel."""
    first, second = inspectable_broker(), inspectable_broker()
    first_id, second_id = first.context.replica_id, second.context.replica_id
    redis = aioredis.Redis.from_url(redis_url)
    pubsub = redis.pubsub()
    await pubsub.psubscribe("rlm:replies:*")
    try:
        async with tenant_and_session(first.url, first.admin_token) as (tenant, session):
            async with BrokerClient(second.url, tenant.token) as on_second:
                # Enqueued and answered on the first replica.
                waiting = asyncio.create_task(
                    session.client.enqueue(p.LLMRequest(prompt="here"), wait_s=30)
                )
                (request,) = (await tenant.client.pending(wait_s=10)).requests
                await tenant.client.respond(p.Answer(id=request.id, response="same replica"))
                assert (await waiting).response == "same replica"

                # Enqueued on the first, answered on the second: pushed to the first.
                waiting = asyncio.create_task(
                    session.client.enqueue(p.LLMRequest(prompt="there"), wait_s=30)
                )
                (across,) = (await on_second.pending(wait_s=10)).requests
                await on_second.respond(p.Answer(id=across.id, response="other replica"))
                assert (await waiting).response == "other replica"

                # Waited on both, answered on the first: pushed to the second only.
                waiting = asyncio.create_task(
                    session.client.enqueue(p.LLMRequest(prompt="both"), wait_s=30)
                )
                (both,) = (await tenant.client.pending(wait_s=10)).requests
                reading = asyncio.create_task(on_second.get_request(both.id, wait_s=30))
                watchers = f"rlm:{{{tenant.tenant_id}}}:req:{both.id}:w"
                for _ in range(3000):
                    if second_id.encode() in await redis.smembers(watchers):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the second replica never watched the request")
                await tenant.client.respond(p.Answer(id=both.id, response="to both"))
                assert (await waiting).response == "to both"
                assert (await reading).response == "to both"
        await redis.publish("rlm:replies:marker", "end")
        seen = await replies_until_marker(pubsub, "rlm:replies:marker")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
    assert [(channel, data.split(b"\n")[0].decode()) for channel, data in seen] == [
        (f"rlm:replies:{first_id}", across.id),
        (f"rlm:replies:{second_id}", both.id),
    ]


async def test_work_enqueued_on_one_replica_wakes_a_long_poll_on_another(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """The first replica wakes its own long-polls without its announcement's echo (it counts
    each of its announcements once); the second hears it through Redis, even with no claim
    since its queue was drained."""
    first, second = inspectable_broker(), inspectable_broker(work_recheck_s=RECHECK_S)
    clock = first.context.signals.mark()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with tenant_and_session(first.url, first.admin_token) as (tenant, session):
            async with BrokerClient(second.url, tenant.token) as on_second:
                rounds = 3
                for round_ in range(rounds):
                    polling = asyncio.create_task(on_second.pending(wait_s=LONG_POLL_S))
                    await long_poll_parked(second, tenant.tenant_id)
                    queued = await session.client.enqueue(
                        p.LLMRequest(prompt=f"{round_}"), wait_s=0
                    )
                    (got,) = (await polling).requests
                    assert got.id == queued.id
            # Once a message published after every echo has reached the first replica's
            # listener, so have the echoes: a forged answer to a request it waits for.
            waiting = asyncio.create_task(
                session.client.enqueue(p.LLMRequest(prompt="last"), wait_s=30)
            )
            request_id = None
            for _ in range(3000):
                await asyncio.sleep(0.01)
                if (request_id := next(iter(first.context.waiters.ids()), None)) is not None:
                    break
            assert request_id is not None, "the enqueue never waited on the first replica"
            forged = {"id": request_id, "status": "done", "response": "forged"}
            channel = f"rlm:replies:{first.context.replica_id}"
            await redis.publish(channel, f"{request_id}\n{json.dumps(forged)}")
            assert (await waiting).response == "forged"
    finally:
        await redis.aclose()
    assert first.context.signals.mark() == clock + rounds + 1


async def test_a_retried_answer_wakes_the_waiter_its_lost_first_try_did_not(
    inspectable_broker: Callable[..., InspectableBroker], redis_url: str
) -> None:
    """An answer recorded on this replica but whose reply never came back (so its waiter
    was not resolved, and nothing was published to it) is delivered by the poller's retry,
    which the broker calls a duplicate."""
    broker = inspectable_broker()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            waiting = asyncio.create_task(
                session.client.enqueue(p.LLMRequest(prompt="2+2?"), wait_s=30)
            )
            (request,) = (await tenant.client.pending(wait_s=10)).requests
            # The first try: the answer script ran for this replica, its reply was lost.
            lost = Store(redis, broker.settings, broker.context.replica_id)
            first = json.dumps({"id": request.id, "status": "done", "response": "first"})
            (outcome,) = await lost.answer(tenant.tenant_id, [(request.id, "done", first)])
            assert outcome.status == "accepted"
            assert not waiting.done()
            retried = await tenant.client.respond(p.Answer(id=request.id, response="retry"))
            assert retried.status == "duplicate"
            assert (await waiting).response == "first"
    finally:
        await redis.aclose()


async def test_enqueues_of_one_tick_run_as_one_script_each_with_its_own_outcome(
    redis_url: str,
) -> None:
    """Calls of one tenant made at once share one script; each gets its own answer, in
    order, as if alone: accepted, a replayed Idempotency-Key, a session over its limit,
    a closed session."""
    settings = BrokerSettings(redis_url=redis_url, max_open_per_session=2)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        store = Store(redis, settings, "replica-a")
        tenant_id, _ = await store.create_tenant("acme")
        busy, _, _ = await store.create_session(tenant_id, 600, None)
        other, _, _ = await store.create_session(tenant_id, 600, None)
        closed, _, _ = await store.create_session(tenant_id, 600, None)
        await store.close_session(tenant_id, closed)

        def item(n: int) -> tuple[str, str]:
            return (f"{tenant_id}.{n:020x}", json.dumps({"prompt": f"p{n}"}))

        await redis.script_load(store.scripts.enqueue.source)  # no NOSCRIPT retry below
        before = await script_calls(redis)
        outcomes = await asyncio.gather(
            store.enqueue(tenant_id, busy, [item(1)], "key-1"),
            store.enqueue(tenant_id, busy, [item(2)], "key-1"),  # replay: nothing stored
            store.enqueue(tenant_id, busy, [item(3)]),
            store.enqueue(tenant_id, busy, [item(4)]),  # over the session's 2 open
            store.enqueue(tenant_id, other, [item(5), item(6)]),
            store.enqueue(tenant_id, closed, [item(7)]),
            return_exceptions=True,
        )
        calls = await script_calls(redis) - before
        stream = await redis.xrange(store.keys.stream(tenant_id))
    finally:
        await redis.aclose()
    assert calls == 1
    assert outcomes[0] is None
    assert outcomes[1] == [item(1)[0]]
    assert outcomes[2] is None
    assert isinstance(outcomes[3], ApiError)
    assert (outcomes[3].status, outcomes[3].code) == (429, "too_many_requests")
    assert outcomes[4] is None
    assert isinstance(outcomes[5], ApiError)
    assert outcomes[5].status == 401
    queued = [(fields or {})[b"id"] for _, fields in stream or []]
    assert queued == [item(n)[0].encode() for n in (1, 3, 5, 6)]


async def test_enqueues_of_one_tick_count_the_tenant_quotas_as_if_alone(
    redis_url: str,
) -> None:
    """The script reads the stream's length and a session's open count once and counts them
    up itself: the calls of one tick still meet the in-flight and queued-bytes quotas in
    order, and each session's open set lives as long as its requests."""
    settings = BrokerSettings(
        redis_url=redis_url, tenant_max_in_flight=3, tenant_max_queued_bytes=10_000
    )
    redis = aioredis.Redis.from_url(redis_url)
    try:
        store = Store(redis, settings, "replica-a")
        tenant_id, _ = await store.create_tenant("acme")
        first, _, _ = await store.create_session(tenant_id, 600, None)
        second, _, _ = await store.create_session(tenant_id, 600, None)

        def item(n: int, size: int = 10) -> tuple[str, str]:
            return (f"{tenant_id}.{n:020x}", json.dumps({"prompt": "p" * size}))

        outcomes = await asyncio.gather(
            store.enqueue(tenant_id, first, [item(1)]),
            store.enqueue(tenant_id, second, [item(2, 20_000)]),  # over the queued bytes
            store.enqueue(tenant_id, second, [item(3), item(4)]),
            store.enqueue(tenant_id, first, [item(5)]),  # a 4th in flight: over
            return_exceptions=True,
        )
        bytes_queued = int(await redis.hget(f"rlm:{{{tenant_id}}}:usage", "bytes") or 0)
        ttls = [await redis.ttl(store.keys.session_open(tenant_id, s)) for s in (first, second)]
        stream = await redis.xrange(store.keys.stream(tenant_id))
    finally:
        await redis.aclose()
    assert [o is None for o in outcomes] == [True, False, True, False]
    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert [(e.status, e.code) for e in refused] == [(429, "quota_exceeded")] * 2
    assert "QUEUED_BYTES" in refused[0].message and "IN_FLIGHT" in refused[1].message
    assert bytes_queued == sum(len(item(n)[1]) for n in (1, 3, 4))
    assert all(0 < ttl <= settings.request_ttl_s for ttl in ttls)
    assert [(fields or {})[b"id"] for _, fields in stream or []] == [
        item(n)[0].encode() for n in (1, 3, 4)
    ]
