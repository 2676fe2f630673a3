"""The poller's parts: answer batching, model routing, call context, error codes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from host_poller.llm import LLMRateLimitError, LLMStatusError, build_client
from host_poller.poller import (
    BrokerLink,
    BudgetExceeded,
    ModelRouter,
    call_context,
    error_answer,
    error_code,
)
from host_poller.poller.poster import AnswerPoster
from rlm_repl import RetryPolicy
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import Answer, PendingRequest
from rlm_wire.errors import ServiceResponseError
from tests.support.servers import BrokerServer
from tests.test_poller import META, enqueue_all, llm_profile, open_tenant_session, results


@pytest.mark.anyio
@pytest.mark.parametrize(("max_items", "batches"), [(64, 1), (4, 3)])
async def test_answers_finished_together_share_one_post(
    broker_server: BrokerServer, max_items: int, batches: int
) -> None:
    _, session = await open_tenant_session(broker_server.url, broker_server.admin_token, META)
    ids = await enqueue_all(session, [f"q{i}" for i in range(10)], depth=1)
    async with BrokerClient(broker_server.url, broker_server.admin_token) as admin:
        leased = await admin.pending(max_items=10, wait_s=5)
        assert len(leased.requests) == 10
        link = BrokerLink(RetryPolicy(), [admin], broker_urls=[broker_server.url])
        settled: list[str] = []
        poster = AnswerPoster(link, max_items=max_items, on_settled=settled.extend)
        for request in leased.requests:
            poster.submit(Answer(id=request.id, response=f"a-{request.prompt}"))
        task = asyncio.create_task(poster.run())
        try:
            assert await poster.flush(10.0)
        finally:
            task.cancel()
    done = await results(session, ids)
    await session.aclose()
    assert [r.response for r in done] == [f"a-q{i}" for i in range(10)]
    assert poster.batches_posted == batches
    assert poster.answers_posted == 10
    assert sorted(settled) == sorted(ids)


def _profiles() -> dict[str, Any]:
    return {
        "sub": llm_profile("http://127.0.0.1:9/v1", name="sub", model="small-model"),
        "big": llm_profile("http://127.0.0.1:9/v1", name="big", model="large-model"),
    }


def test_router_picks_profile_by_name_or_model_else_default() -> None:
    router = ModelRouter(_profiles(), "sub", build_client)
    assert router.profile_name(None) == "sub"
    assert router.profile_name("big") == "big"
    assert router.profile_name("large-model") == "big"
    assert router.profile_name("unknown-model") == "sub"
    assert router.client("large-model") is router.client("big")
    assert router.client(None).model == "small-model"


def test_router_refuses_an_unknown_default() -> None:
    with pytest.raises(ValueError, match="default profile"):
        ModelRouter(_profiles(), "nope", build_client)


def _pending(**fields: Any) -> PendingRequest:
    base: dict[str, Any] = {
        "id": "r1", "session_id": "s1", "tenant_id": "t1", "prompt": "p",
        "attempt": 1, "enqueued_at": 0.0, "lease_s": 60.0, "lease_expires_at": 0.0,
    }  # fmt: skip
    return PendingRequest(**(base | fields))


def test_call_context_takes_depth_from_the_session_metadata() -> None:
    call = call_context(
        _pending(depth=0, params={"kind": "rlm"}, metadata={"run_id": "x", "depth": 1,
                                                            "max_depth": 3})
    )  # fmt: skip
    assert (call.depth, call.max_depth, call.kind, call.run_id) == (2, 3, "rlm", "x")
    assert call.wants_sub_rlm


def test_call_context_without_metadata_never_wants_a_sub_rlm() -> None:
    call = call_context(_pending(depth=1, params={"kind": "rlm"}))
    assert (call.depth, call.max_depth, call.run_id) == (1, None, None)
    assert not call.wants_sub_rlm


def test_error_codes() -> None:
    assert error_code(LLMRateLimitError("x", model="m")) == "llm_rate_limited"
    assert error_code(LLMStatusError("x", model="m", status_code=500)) == "llm_http_error"
    assert error_code(BudgetExceeded("spent")) == "budget_exceeded"
    answer = error_answer("r1", KeyError("secret detail"))
    assert answer.error is not None
    assert answer.error.code == "internal_error"
    assert "secret detail" not in answer.error.message
    assert answer.response is None


def test_link_fails_over_at_once_and_pauses_once_every_broker_failed() -> None:
    from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

    clients = [BrokerClient(f"http://127.0.0.1:{port}", "t") for port in (9, 10)]
    link = BrokerLink(RetryPolicy(initial_s=0.1, max_pause_s=1.0), clients, broker_urls=["a", "b"])
    assert link.client is clients[0] and link.reachable
    link.failed(ServiceUnreachable("down"), clients[0])
    assert link.client is clients[1] and link.delay() == 0.0  # the next broker, at once
    link.failed(ServiceUnreachable("down"), clients[0])  # late news of the one we left
    assert link.client is clients[1]
    link.failed(ServiceUnreachable("down"), clients[1])
    assert link.client is clients[0]
    assert 0.05 <= link.delay() <= 1.0  # a round failed: the retry policy's pause
    busy = ServiceResponseError(429, "rate_limited", "slow down", {"Retry-After": "3"})
    link.failed(busy)
    assert link.client is clients[0]  # a quota is not a broken replica
    assert link.delay(busy) >= 3.0  # the broker's Retry-After wins
    link.succeeded()
    assert link.reachable and link.failed_tries == 0 and link.outages == 1


def test_leases_are_timed_on_the_local_monotonic_clock_whatever_the_broker_says() -> None:
    from host_poller.poller.leases import LeaseKeeper

    now = [1000.0]
    client = BrokerClient("http://127.0.0.1:9", "t")
    link = BrokerLink(RetryPolicy(), [client], broker_urls=["a"])
    keeper = LeaseKeeper(link, clock=lambda: now[0])
    # The broker's wall clock is 30 s behind and 30 s ahead: neither matters.
    keeper.track(_pending(id="behind", lease_s=10.0, lease_expires_at=time.time() - 30))
    keeper.track(_pending(id="ahead", lease_s=10.0, lease_expires_at=time.time() + 30))
    assert keeper.holds("behind") and keeper.holds("ahead")
    now[0] += 9.9
    assert keeper.holds("behind") and keeper.holds("ahead")
    now[0] += 0.2  # past the lease on this host's clock, e.g. after a SIGSTOP
    assert not keeper.holds("behind") and not keeper.holds("ahead")
    keeper.release("behind")
    assert len(keeper) == 1


@pytest.mark.anyio
async def test_an_answer_read_just_after_a_pause_counts_from_before_it() -> None:
    """Resumed after a pause (SIGSTOP), a process's heartbeat runs first in the loop's pass,
    then the answers that arrived during the pause are read: a renewal sent before the
    pause must count from before it, not from that beat. A resumed poller counted it from
    the beat and started a call whose lease was long over at the broker (CI, once)."""
    from host_poller.poller.leases import LeaseKeeper

    now = [1000.0]
    client = BrokerClient("http://127.0.0.1:9", "t")
    link = BrokerLink(RetryPolicy(), [client], broker_urls=["a"])
    keeper = LeaseKeeper(link, clock=lambda: now[0])
    beat = asyncio.create_task(keeper._beat())
    try:
        await asyncio.sleep(0)  # one beat at 1000.0
        sent_at = now[0]  # a renewal is sent, and the process is stopped for 5 s
        now[0] += 5.0
        await asyncio.sleep(0.06)  # resumed: the beat's pass, then the answer is read
        assert keeper.arrived_at(sent_at) < 1000.1
        keeper._schedule("renewed", 2.0, keeper.arrived_at(sent_at))
        assert not keeper.surely_held("renewed") and not keeper.holds("renewed")
        await asyncio.sleep(0.06)  # the next beat counts again
        assert keeper.arrived_at(None) == now[0]
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)


def test_a_call_starts_only_while_a_quarter_of_its_lease_is_left() -> None:
    # The broker's lease began before its answer arrived here: near its local end it may be
    # over at the broker and the request another poller's, so no call starts then.
    from host_poller.poller.leases import LeaseKeeper

    now = [1000.0]
    client = BrokerClient("http://127.0.0.1:9", "t")
    link = BrokerLink(RetryPolicy(), [client], broker_urls=["a"])
    keeper = LeaseKeeper(link, clock=lambda: now[0])
    keeper.track(_pending(id="held", lease_s=2.0))
    assert keeper.surely_held("held")
    now[0] += 1.49
    assert keeper.surely_held("held")
    now[0] += 0.02  # a quarter of the lease left: still held, no longer started
    assert keeper.holds("held") and not keeper.surely_held("held")
    assert not keeper.surely_held("never delivered")


@pytest.mark.anyio
async def test_a_lease_wakes_the_keeper_only_when_due_before_its_planned_wake(
    broker_server: BrokerServer,
) -> None:
    from host_poller.poller.leases import LeaseKeeper

    async with BrokerClient(broker_server.url, broker_server.admin_token) as admin:
        link = BrokerLink(RetryPolicy(), [admin], broker_urls=[broker_server.url])
        keeper = LeaseKeeper(link)
        task = asyncio.create_task(keeper.run())
        try:
            keeper.track(_pending(id="first", lease_s=600.0))
            await asyncio.sleep(0.05)  # the keeper plans its next wake: in 300 s
            keeper.track(_pending(id="later", lease_s=900.0))
            assert not keeper._changed.is_set()  # due after that wake: left asleep
            keeper.track(_pending(id="sooner", lease_s=0.2))
            assert keeper._changed.is_set()
            # Renewed at its half-life: the broker never leased it, so it is lost at once.
            for _ in range(100):
                if keeper.lost:
                    break
                await asyncio.sleep(0.05)
            assert keeper.lost == 1 and not keeper.holds("sooner")
            assert keeper.holds("first") and keeper.holds("later")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.anyio
async def test_leases_due_together_are_renewed_in_batches_the_broker_accepts(
    broker_factory: Callable[..., BrokerServer],
) -> None:
    """The broker bounds the ids of one renewal (RLM_MAX_RESPOND_BATCH, 413 past it): a
    poller holding more leases due at once renews them in several calls, and keeps all."""
    from host_poller.poller.leases import LeaseKeeper

    broker = broker_factory(lease_s=0.8, max_respond_batch=2)
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    await enqueue_all(session, [f"q{i}" for i in range(5)], depth=1)
    async with session, BrokerClient(broker.url, broker.admin_token) as admin:
        held = (await admin.pending(max_items=5, wait_s=5)).requests
        assert len(held) == 5
        with pytest.raises(ServiceResponseError) as too_many:
            await admin.extend_leases([r.id for r in held])
        assert too_many.value.status == 413
        link = BrokerLink(RetryPolicy(), [admin], broker_urls=[broker.url])
        keeper = LeaseKeeper(link, max_batch=2)
        for request in held:
            keeper.track(request)
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.sleep(1.2)  # one and a half leases: each renewed at least once
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert keeper.lost == 0 and keeper.extensions >= 5
        assert all(keeper.holds(r.id) for r in held)
        # Renewed, they were never delivered again.
        assert (await admin.pending(max_items=5, wait_s=0)).requests == []
