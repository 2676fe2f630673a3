"""The poller against the real broker (real Redis) and the real openai SDK on the fake LLM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import SecretStr

from fake_llm import FakeLLMServer, Scenario
from host_poller.llm import Profile, UsageLedger, build_client
from host_poller.poller import (
    CallContext,
    ModelRouter,
    Poller,
    PollerSettings,
    RequestHandler,
    SubRLMResult,
)
from host_poller.poller.hooks import BudgetLookup, SubRLMRunner
from host_poller.rlm.budget import Budget, RunBudgets
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import Answer, LLMRequest, PendingRequest, RequestResult
from tests.support.arrivals import ArrivalRelay
from tests.support.servers import BrokerServer, wait_until

# --- helpers (also used by tests/test_poller_*.py) -------------------------------------------


def echo_scenario(faults: Mapping[str, Any] | None = None) -> Scenario:
    """Answers `echo: <last user message>`; `faults` apply to that rule."""
    rule: dict[str, Any] = {
        "name": "echo",
        "match": {"user": "^(?P<q>.*)$"},
        "reply": {"kind": "text", "text": "echo: ${q}"},
    }
    if faults is not None:
        rule["faults"] = faults
    return Scenario.model_validate({"name": "echo", "rules": [rule]})


def llm_profile(base_url: str, **overrides: Any) -> Profile:
    fields: dict[str, Any] = {
        "name": "sub", "base_url": base_url, "model": "fake-sub",
        "input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0,
        "timeout_s": 10.0, "max_retries": 0, "concurrency": 64,
    }  # fmt: skip
    fields.update(overrides)
    return Profile.model_validate(fields)


def poller_settings(
    broker: BrokerServer, token: str | None = None, **overrides: Any
) -> PollerSettings:
    """Settings of a poller of `broker`, with its admin token unless `token` is given."""
    fields: dict[str, Any] = {
        "broker_url": broker.url, "admin_token": SecretStr(token or broker.admin_token),
        "tenant_token": None,
        "poller_wait_s": 5.0, "poller_grace_s": 10.0, "poller_backoff_initial_s": 0.02,
        "poller_backoff_max_s": 0.2,
    }  # fmt: skip
    fields.update(overrides)
    return PollerSettings(**fields)


async def open_tenant_session(
    broker_url: str, admin_token: str, metadata: Mapping[str, Any] | None = None, name: str = "t"
) -> tuple[str, BrokerClient]:
    """(tenant id, a client holding a new session's token); the caller closes the client."""
    async with BrokerClient(broker_url, admin_token) as admin:
        tenant = await admin.create_tenant(name)
    async with BrokerClient(broker_url, tenant.token) as tenant_client:
        session = await tenant_client.create_session(metadata=dict(metadata or {}))
    return tenant.tenant_id, BrokerClient(broker_url, session.token)


async def enqueue_all(session: BrokerClient, prompts: list[str], **fields: Any) -> list[str]:
    batch = await session.enqueue_batch([LLMRequest(prompt=p, **fields) for p in prompts], wait_s=0)
    return [r.id for r in batch.results]


async def results(
    session: BrokerClient, ids: list[str], wait_s: float = 20.0
) -> list[RequestResult]:
    out = []
    for request_id in ids:
        result = await session.get_request(request_id, wait_s=wait_s)
        out.append(await session.wait_result(result, wait_s=wait_s))
    return out


def make_poller(
    settings: PollerSettings,
    base_url: str,
    *,
    ledger: UsageLedger | None = None,
    budgets: BudgetLookup | None = None,
    sub_rlm: SubRLMRunner | None = None,
    **profile: Any,
) -> Poller:
    router = ModelRouter({"sub": llm_profile(base_url, **profile)}, "sub", build_client)
    handler = RequestHandler(router, ledger=ledger, budgets=budgets, sub_rlm=sub_rlm)
    return Poller(settings, handler)


@asynccontextmanager
async def poller_of(
    settings: PollerSettings, base_url: str, **kwargs: Any
) -> AsyncIterator[Poller]:
    """A poller (see `make_poller`), closed with its LLM clients on exit."""
    poller = make_poller(settings, base_url, **kwargs)
    try:
        yield poller
    finally:
        await poller.aclose()
        await poller.handler.router.aclose()


@asynccontextmanager
async def running(poller: Poller) -> AsyncIterator[asyncio.Task[None]]:
    """`poller.run()` in the background; stopped (calls in flight finished) on exit."""
    task = asyncio.create_task(poller.run())
    try:
        yield task
    finally:
        await poller.stop()
        await task


async def drain_once(settings: PollerSettings, base_url: str, **kwargs: Any) -> int:
    """A poller that drains the queue once, then closes; the count of requests answered."""
    async with poller_of(settings, base_url, **kwargs) as poller:
        return await poller.drain()


@pytest.fixture
def fake_llm() -> Iterator[Callable[..., FakeLLMServer]]:
    started: list[FakeLLMServer] = []

    def start(faults: Mapping[str, Any] | None = None) -> FakeLLMServer:
        server = FakeLLMServer(echo_scenario(faults)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def session_of(broker_server: BrokerServer) -> AsyncIterator[Callable[..., Any]]:
    clients: list[BrokerClient] = []

    async def open_session(metadata: Mapping[str, Any] | None = None, name: str = "t") -> Any:
        tenant_id, client = await open_tenant_session(
            broker_server.url, broker_server.admin_token, metadata, name
        )
        clients.append(client)
        return tenant_id, client

    yield open_session
    for client in clients:
        await client.aclose()


META = {"run_id": "run-1", "depth": 0, "max_depth": 1}


# --- one-shot mode -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_round_trip_records_usage(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    tenant_id, session = await session_of(META)
    ids = await enqueue_all(session, ["alpha", "beta", "gamma"], depth=1)
    ledger = UsageLedger()
    assert await drain_once(poller_settings(broker_server), fake.base_url, ledger=ledger) == 3
    done = await results(session, ids)
    assert [r.status for r in done] == ["done"] * 3
    assert [r.response for r in done] == ["echo: alpha", "echo: beta", "echo: gamma"]
    assert all(r.usage is not None and r.usage.calls == 1 for r in done)
    assert all(r.usage is not None and r.usage.cost_usd > 0 for r in done)
    rows = ledger.totals(group_by=("tenant_id", "run_id", "model", "depth"))
    assert len(rows) == 1
    keys, usage = rows[0]
    assert keys == {"tenant_id": tenant_id, "run_id": "run-1", "model": "fake-sub", "depth": 1}
    assert usage.calls == 3
    assert usage.input_tokens == sum(r.usage.input_tokens for r in done if r.usage)


@pytest.mark.anyio
async def test_llm_failure_is_an_error_not_a_response(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"fail_first_n": 100, "status": 500})
    _, session = await session_of(META)
    ids = await enqueue_all(session, ["boom"], depth=1)
    async with poller_of(poller_settings(broker_server), fake.base_url) as poller:
        await poller.drain()
    [result] = await results(session, ids)
    assert result.status == "error"
    assert result.response is None
    assert result.error is not None
    assert result.error.code == "llm_http_error"
    assert "500" in result.error.message
    assert poller.stats.failed == 1


@pytest.mark.anyio
async def test_rate_limit_retried_then_usage_counted_once(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"fail_first_n": 1, "status": 429, "retry_after_s": 0.01})
    _, session = await session_of(META)
    ids = await enqueue_all(session, ["again"], depth=1)
    ledger = UsageLedger()
    await drain_once(
        poller_settings(broker_server),
        fake.base_url,
        ledger=ledger,
        max_retries=2,
    )
    [result] = await results(session, ids)
    assert result.status == "done"
    assert result.response == "echo: again"
    assert fake.stats()["failures_sent"] == 1
    assert fake.stats()["requests"] == 2
    assert ledger.total().calls == 1
    assert result.usage is not None and result.usage.calls == 1


@pytest.mark.anyio
async def test_rate_limit_spent_gives_rate_limited_code(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"fail_first_n": 100, "status": 429, "retry_after_s": 0.01})
    _, session = await session_of(META)
    ids = await enqueue_all(session, ["again"], depth=1)
    await drain_once(poller_settings(broker_server), fake.base_url, max_retries=1)
    [result] = await results(session, ids)
    assert result.status == "error"
    assert result.error is not None and result.error.code == "llm_rate_limited"


@pytest.mark.anyio
async def test_budget_exceeded_is_an_error_answer(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    budgets = RunBudgets()
    budgets.open("run-1", Budget(max_sub_calls=2))
    _, session = await session_of(META)
    ids = await enqueue_all(session, ["one", "two", "three"], depth=1)
    await drain_once(
        poller_settings(broker_server, poller_concurrency=1),
        fake.base_url,
        budgets=budgets,
    )
    done = await results(session, ids)
    assert [r.status for r in done] == ["done", "done", "error"]
    error = done[2].error
    assert error is not None and error.code == "budget_exceeded"
    assert "sub-call budget of 2 calls spent" in error.message
    assert fake.stats()["requests"] == 2


@pytest.mark.anyio
async def test_depth_beyond_max_depth_is_refused(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    # The session is an RLM at depth 2 of a run with max_depth 1: its calls are at depth 3,
    # whatever depth the request itself claims.
    _, session = await session_of({"run_id": "r", "depth": 2, "max_depth": 1})
    ids = await enqueue_all(session, ["deep"], depth=1)
    await drain_once(poller_settings(broker_server), fake.base_url)
    [result] = await results(session, ids)
    assert result.status == "error"
    assert result.error is not None and result.error.code == "budget_exceeded"
    assert "depth 3" in result.error.message
    assert fake.stats()["requests"] == 0


@pytest.mark.anyio
async def test_an_answer_made_at_once_is_posted_before_the_next_long_poll(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    """A call answered without waiting (here refused for its depth) has its answer posted
    before the poller's next long-poll goes out: its caller waits on it, the long-poll would
    only wait at the broker. The broker's arrivals are read off the kernel's stamps."""
    fake = fake_llm()
    _, session = await session_of({"run_id": "r", "depth": 2, "max_depth": 1})
    with ArrivalRelay(broker_server.port) as relay:
        settings = poller_settings(broker_server, broker_url=relay.url, poller_wait_s=30.0)

        def lines() -> list[str]:
            return [line for _, line in relay.arrivals]

        async with poller_of(settings, fake.base_url) as poller, running(poller):
            await wait_until(lambda: any(" /pending" in line for line in lines()))
            enqueued_at = time.time_ns()  # the first long-poll is parked at the broker
            ids = await enqueue_all(session, ["deep"], depth=1)
            [result] = await results(session, ids)
            # Its answer, and the long-poll after the one that leased it.
            await wait_until(
                lambda: (
                    any(line.startswith("POST /respond") for line in lines())
                    and sum(line.startswith("GET /pending") for line in lines()) >= 2
                )
            )
        arrivals = relay.arrivals
    assert result.error is not None and result.error.code == "budget_exceeded"
    [(answered_at, _)] = [(t, line) for t, line in arrivals if line.startswith("POST /respond")]
    polls = [t for t, line in arrivals if line.startswith("GET /pending")]
    assert [t for t in polls if enqueued_at < t < answered_at] == [], arrivals
    assert any(t > answered_at for t in polls), arrivals


class RecordingSubRLM:
    """A stand-in for the RLM loop's sub-RLM: answers from the request and its state."""

    def __init__(self) -> None:
        self.calls: list[CallContext] = []

    async def __call__(self, request: PendingRequest, call: CallContext) -> SubRLMResult:
        self.calls.append(call)
        state = dict(request.state or {})
        state["visits"] = int(str(state.get("visits", 0))) + 1
        from host_poller.llm import Usage

        return SubRLMResult(
            response=f"sub-rlm: {request.prompt}", usage=Usage(10, 5, 0.0, 2), state=state
        )


@pytest.mark.anyio
async def test_rlm_kind_below_max_depth_goes_to_a_sub_rlm(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    sub_rlm = RecordingSubRLM()
    _, session = await session_of({"run_id": "r", "depth": 0, "max_depth": 2})
    rlm_ids = await enqueue_all(
        session, ["think"], depth=1, params={"kind": "rlm"}, state={"visits": 1}
    )
    llm_ids = await enqueue_all(session, ["plain"], depth=1, params={"kind": "llm"})
    await drain_once(poller_settings(broker_server), fake.base_url, sub_rlm=sub_rlm)
    [rlm_result, llm_result] = await results(session, rlm_ids + llm_ids)
    assert rlm_result.status == "done"
    assert rlm_result.response == "sub-rlm: think"
    assert rlm_result.state == {"visits": 2}
    assert rlm_result.usage is not None and rlm_result.usage.calls == 2
    assert [(c.depth, c.max_depth, c.kind) for c in sub_rlm.calls] == [(1, 2, "rlm")]
    assert llm_result.response == "echo: plain"


@pytest.mark.anyio
async def test_rlm_kind_at_max_depth_is_a_plain_completion(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    sub_rlm = RecordingSubRLM()
    _, session = await session_of({"run_id": "r", "depth": 0, "max_depth": 1})
    ids = await enqueue_all(session, ["leaf"], depth=1, params={"kind": "rlm"})
    await drain_once(poller_settings(broker_server), fake.base_url, sub_rlm=sub_rlm)
    [result] = await results(session, ids)
    assert result.response == "echo: leaf"
    assert sub_rlm.calls == []


@pytest.mark.anyio
async def test_rlm_kind_without_a_sub_rlm_runner_is_an_error(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm()
    _, session = await session_of({"run_id": "r", "depth": 0, "max_depth": 2})
    ids = await enqueue_all(session, ["think"], depth=1, params={"kind": "rlm"})
    await drain_once(poller_settings(broker_server), fake.base_url)
    [result] = await results(session, ids)
    assert result.status == "error"
    assert result.error is not None and result.error.code == "sub_rlm_unavailable"
    assert fake.stats()["requests"] == 0


# --- the serving loop -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrency_limit_is_respected(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"delay_s": 0.15})
    _, session = await session_of(META)
    ids = await enqueue_all(session, [f"p{i}" for i in range(12)], depth=1)
    settings = poller_settings(broker_server, poller_concurrency=3)
    async with poller_of(settings, fake.base_url) as poller, running(poller):
        done = await results(session, ids)
    assert all(r.status == "done" for r in done)
    assert fake.stats()["max_in_flight"] == 3
    assert poller.stats.max_running == 3


@pytest.mark.anyio
async def test_per_tenant_concurrency_leaves_room_for_others(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"delay_s": 0.1})
    tenant_a, session_a = await session_of(META, name="a")
    tenant_b, session_b = await session_of(META, name="b")
    ids_a = await enqueue_all(session_a, [f"a{i}" for i in range(10)], depth=1)
    ids_b = await enqueue_all(session_b, [f"b{i}" for i in range(10)], depth=1)
    settings = poller_settings(broker_server,
        poller_concurrency=4, poller_tenant_concurrency=2,
    )  # fmt: skip
    async with poller_of(settings, fake.base_url) as poller, running(poller):
        done = await results(session_a, ids_a) + await results(session_b, ids_b)
    assert all(r.status == "done" for r in done)
    assert poller.stats.max_running_by_tenant == {tenant_a: 2, tenant_b: 2}
    assert fake.stats()["max_in_flight"] <= 4
    assert poller.stats.max_running == 4  # both tenants ran side by side


@pytest.mark.anyio
async def test_stop_finishes_calls_in_flight(
    broker_server: BrokerServer, fake_llm: Any, session_of: Any
) -> None:
    fake = fake_llm({"delay_s": 0.5})
    _, session = await session_of(META)
    ids = await enqueue_all(session, ["slow1", "slow2"], depth=1)
    async with poller_of(poller_settings(broker_server), fake.base_url) as poller:
        async with running(poller) as task:
            await wait_until(lambda: fake.stats()["in_flight"] == 2)
            await poller.stop()
            assert task.done()
            assert poller.stats.answered == 2
            assert poller.stats.abandoned == 0
    done = await results(session, ids, wait_s=0)
    assert [r.response for r in done] == ["echo: slow1", "echo: slow2"]


@pytest.mark.anyio
async def test_stop_after_grace_hands_back_the_calls_it_gives_up(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    """A call still running when the grace ends is cancelled and its lease handed back:
    another poller answers it at once, not once the lease (10 minutes here) has run out."""
    broker = broker_factory(lease_s=600)
    stuck = fake_llm({"delay_s": 30})
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["stuck"], depth=1)
    settings = poller_settings(broker, poller_grace_s=0.2)
    async with session:
        async with poller_of(settings, stuck.base_url) as poller, running(poller):
            await wait_until(lambda: stuck.stats()["in_flight"] == 1)
            await poller.stop()
        assert (poller.stats.abandoned, poller.stats.handed_back) == (1, 1)
        assert (await session.get_request(ids[0], wait_s=0)).status == "pending"
        instant = fake_llm()
        async with poller_of(poller_settings(broker), instant.base_url) as other, running(other):
            [result] = await results(session, ids, wait_s=10)
    assert result.response == "echo: stuck"
    assert other.stats.answered == 1


@pytest.mark.anyio
async def test_a_stopping_poller_starts_nothing_more_and_hands_back_what_waited(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    """Of two requests of one tenant held with one slot, the running call finishes in the
    grace period; the one still waiting for the slot is not started (not paid) but handed
    back at once, and another poller answers it."""
    broker = broker_factory(lease_s=600)
    slow = fake_llm({"delay_s": 1.0})
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["first", "second"], depth=1)
    settings = poller_settings(broker, poller_grace_s=20, poller_tenant_concurrency=1)
    async with session:
        async with poller_of(settings, slow.base_url) as poller, running(poller):
            await wait_until(lambda: poller.stats.fetched == 2 and slow.stats()["in_flight"] == 1)
            await poller.stop()
        assert slow.stats()["requests"] == 1  # the waiting one never reached the LLM
        assert (poller.stats.answered, poller.stats.abandoned) == (1, 1)
        assert poller.stats.handed_back == 1
        instant = fake_llm()
        async with poller_of(poller_settings(broker), instant.base_url) as other, running(other):
            done = await results(session, ids, wait_s=10)
    assert sorted(r.response or "" for r in done) == ["echo: first", "echo: second"]
    assert instant.stats()["requests"] == 1


@pytest.mark.anyio
async def test_a_stopping_poller_hands_back_only_leases_surely_its_own_in_batches(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    """A lease with under a quarter left may be another poller's already: a stopping poller
    keeps its hands off it. The others go back in calls of RLM_POLLER_RESPOND_BATCH, and
    the metrics say how many."""
    from host_poller.poller.metrics import PollerMetrics

    broker = broker_factory(lease_s=600, max_respond_batch=1)
    slow = fake_llm({"delay_s": 1.0})
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["a", "b", "c", "d"], depth=1)
    settings = poller_settings(
        broker, poller_grace_s=20, poller_tenant_concurrency=1, poller_respond_batch=1
    )
    async with session, BrokerClient(broker.url, broker.admin_token) as admin:
        async with poller_of(settings, slow.base_url) as poller, running(poller):
            metrics = PollerMetrics()
            metrics.bind(poller)
            await wait_until(lambda: poller.stats.fetched == 4 and slow.stats()["in_flight"] == 1)
            waiting = [rid for rid in poller._held if rid not in poller._started]
            assert len(waiting) == 3
            # Its lease as if its renewals had failed: 20 % of it left.
            aged = waiting[0]
            poller.leases._schedule(aged, 600, time.monotonic() - 480)
            await poller.stop()
        assert poller.stats.handed_back == 2
        exported = metrics.render().decode()
        assert "rlm_poller_leases_handed_back_total 2.0" in exported
        assert 'rlm_poller_requests_total{code="",outcome="abandoned"} 3.0' in exported
        again = (await admin.pending(max_items=8, wait_s=5)).requests
        assert sorted(r.id for r in again) == sorted(rid for rid in waiting if rid != aged)
        assert (await admin.pending(wait_s=0.3)).requests == []  # the aged one: still leased
    assert slow.stats()["requests"] == 1 and set(waiting) < set(ids)


@pytest.mark.anyio
async def test_a_stopping_poller_reports_the_long_poll_whose_answer_it_lost(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    """A long-poll's answer that never arrived whole (here: one the stop cut short) is
    reported with the next long-poll; a stopping poller makes none, so it reports it as it
    hands back: what that poll was leased comes back at once, not after 10 minutes."""
    broker = broker_factory(lease_s=600)
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["never seen"], depth=1)
    async with session, BrokerClient(broker.url, broker.admin_token) as admin:
        # The broker leases the request to a long-poll of the poller's (its token, its poll
        # id) whose answer the poller never read.
        lost = await admin.pending(wait_s=5, poll_id="lost-poll-000001")
        assert [r.id for r in lost.requests] == ids
        async with poller_of(poller_settings(broker), fake_llm().base_url) as poller:
            poller._lost_polls.lost("lost-poll-000001")  # as `_fetch` notes a lost answer
        again = (await admin.pending(wait_s=5)).requests
    assert [(r.id, r.attempt) for r in again] == [(ids[0], 2)]


@pytest.mark.anyio
async def test_slow_calls_keep_their_lease(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    broker = broker_factory(lease_s=0.6)
    fake = fake_llm({"delay_s": 1.5})
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["long"], depth=1)
    async with (
        session,
        poller_of(poller_settings(broker), fake.base_url) as poller,
        running(poller),
    ):
        [result] = await results(session, ids)
    assert result.response == "echo: long"
    assert poller.leases.extensions >= 2
    assert fake.stats()["requests"] == 1  # never delivered twice
    assert poller.stats.fetched == 1


@pytest.mark.anyio
async def test_a_lost_lease_cancels_the_call_in_flight(
    broker_factory: Callable[..., BrokerServer], fake_llm: Any
) -> None:
    broker = broker_factory(lease_s=1.0)
    fake = fake_llm({"delay_s": 30})
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    ids = await enqueue_all(session, ["slow"], depth=1)
    async with (
        session,
        BrokerClient(broker.url, broker.admin_token) as elsewhere,
        poller_of(poller_settings(broker), fake.base_url) as poller,
        running(poller),
    ):
        await wait_until(lambda: fake.stats()["in_flight"] == 1)
        # Someone else answers it: the next renewal finds the lease gone.
        await elsewhere.respond(Answer(id=ids[0], response="answered elsewhere"))
        await wait_until(lambda: poller.stats.leases_lost == 1)
        await wait_until(lambda: fake.stats()["in_flight"] == 0)  # the call was cancelled
        [result] = await results(session, ids)
    assert result.response == "answered elsewhere"
    assert (poller.stats.answered, poller.stats.abandoned) == (0, 0)
    assert fake.stats()["requests"] == 1


@pytest.mark.anyio
async def test_broker_outage_logged_once_and_served_after(
    redis_url: str, fake_llm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="host_poller.poller")
    fake = fake_llm()
    broker = BrokerServer(redis_url).start()
    port = broker.port
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    restarted: BrokerServer | None = None
    try:
        async with (
            session,
            poller_of(poller_settings(broker), fake.base_url) as poller,
            running(poller),
        ):
            [first] = await results(session, await enqueue_all(session, ["before"], depth=1))
            assert first.response == "echo: before"
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not poller.link.reachable)
            # Several tries fail while the broker is away.
            await wait_until(lambda: poller.link.failed_tries >= 3)
            restarted = await asyncio.to_thread(BrokerServer(redis_url, port=port).start)
            [after] = await results(session, await enqueue_all(session, ["after"], depth=1))
            assert after.response == "echo: after"
    finally:
        if restarted is not None:
            await asyncio.to_thread(restarted.stop)
    messages = [r.getMessage() for r in caplog.records if r.name == "host_poller.poller.link"]
    assert messages == ["broker unreachable", "broker reachable again"]
    assert poller.link.outages == 1


@pytest.mark.anyio
async def test_refused_token_stops_the_poller(broker_server: BrokerServer, fake_llm: Any) -> None:
    from host_poller.poller import BrokerRejected

    fake = fake_llm()
    async with poller_of(poller_settings(broker_server, "not-a-token"), fake.base_url) as poller:
        with pytest.raises(BrokerRejected) as caught:
            await poller.run()
    assert caught.value.status == 401
    assert "not-a-token" not in str(caught.value)


@pytest.mark.anyio
async def test_answer_finished_during_an_outage_is_posted_after(
    redis_url: str, fake_llm: Any
) -> None:
    fake = fake_llm({"delay_s": 0.5})
    broker = BrokerServer(redis_url, lease_s=30).start()
    _, session = await open_tenant_session(broker.url, broker.admin_token, META)
    restarted: BrokerServer | None = None
    try:
        async with (
            session,
            poller_of(poller_settings(broker), fake.base_url) as poller,
            running(poller),
        ):
            ids = await enqueue_all(session, ["through the outage"], depth=1)
            await wait_until(lambda: fake.stats()["in_flight"] == 1)
            await asyncio.to_thread(broker.stop)
            # The call ends while the broker is away: its answer waits in the poster.
            await wait_until(lambda: poller.stats.answered == 1 and poller.poster.unsettled == 1)
            await wait_until(lambda: poller.link.failed_tries >= 2)
            restarted = await asyncio.to_thread(BrokerServer(redis_url, port=broker.port).start)
            [result] = await results(session, ids)
    finally:
        if restarted is not None:
            await asyncio.to_thread(restarted.stop)
    assert result.response == "echo: through the outage"
    assert poller.poster.answers_dropped == 0
