"""OpenAIChatClient against the scripted LLM: retries, typed errors, timeouts, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import traceback
from collections.abc import Iterator, Mapping

import pytest

from fake_llm import FakeLLMServer, Scenario
from host_poller.llm import (
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    LLMStatusError,
    LLMTimeoutError,
    Profile,
    Usage,
    UsageLedger,
    build_client,
)

SECRET = "sk-test-0123456789-very-secret"


def server(reply: Mapping[str, object], faults: Mapping[str, object] | None = None,
           **extra: object) -> FakeLLMServer:  # fmt: skip
    rule: dict[str, object] = {"name": "r", "reply": reply}
    if faults is not None:
        rule["faults"] = faults
    return FakeLLMServer(Scenario.model_validate({"name": "t", "rules": [rule], **extra}))


def profile(base_url: str, **overrides: object) -> Profile:
    fields: dict[str, object] = {
        "name": "test", "base_url": base_url, "model": "fake-sub",
        "input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0,
        "timeout_s": 10.0, "max_retries": 2,
    }  # fmt: skip
    fields.update(overrides)
    return Profile.model_validate(fields)


USER = [{"role": "user", "content": "hello there, how are you today?"}]


@pytest.fixture
def ok_server() -> Iterator[FakeLLMServer]:
    with server({"kind": "text", "text": "fine, thanks"}) as fake:
        yield fake


@pytest.mark.anyio
async def test_completion_has_text_usage_cost_and_one_attempt(ok_server: FakeLLMServer) -> None:
    client = build_client(profile(ok_server.base_url))
    try:
        result = await client.complete(USER, params={"temperature": 0.0})
    finally:
        await client.aclose()
    assert result.text == "fine, thanks"
    assert result.model == "fake-sub"
    assert result.attempts == 1
    assert result.latency_s > 0
    usage = result.usage
    assert usage.calls == 1
    assert usage.input_tokens == len(USER[0]["content"]) // 4 + 1
    assert usage.output_tokens == len("fine, thanks") // 4 + 1
    assert usage.cost_usd == pytest.approx((usage.input_tokens + 2 * usage.output_tokens) / 1e6)


@pytest.mark.anyio
async def test_reserved_params_are_refused(ok_server: FakeLLMServer) -> None:
    client = build_client(profile(ok_server.base_url))
    try:
        with pytest.raises(ValueError, match="model"):
            await client.complete(USER, params={"model": "other"})
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 500])
async def test_retried_then_success_counts_usage_once(status: int) -> None:
    faults = {"fail_first_n": 2, "status": status, "retry_after_s": 0.01}
    with server({"kind": "text", "text": "ok"}, faults) as fake:
        client = build_client(profile(fake.base_url, max_retries=3))
        ledger = UsageLedger()
        try:
            result = await client.complete(USER)
        finally:
            await client.aclose()
        ledger.record(usage=result.usage, model=result.model, depth=1, run_id="r1")
        assert result.attempts == 3
        assert fake.stats()["requests"] == 3
        assert fake.stats()["failures_sent"] == 2
    total = ledger.total(run_id="r1")
    assert total.calls == 1
    assert total == result.usage


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"), [(429, LLMRateLimitError), (500, LLMStatusError), (400, LLMStatusError)]
)
async def test_retries_spent_raise_a_typed_error(status: int, error: type[LLMError]) -> None:
    faults = {"fail_first_n": 10, "status": status, "retry_after_s": 0.01}
    with server({"kind": "text", "text": "ok"}, faults) as fake:
        client = build_client(profile(fake.base_url, max_retries=2))
        try:
            with pytest.raises(error) as info:
                await client.complete(USER)
        finally:
            await client.aclose()
        # 400 is not retried by the SDK; 429 and 5xx are, max_retries times.
        assert fake.stats()["requests"] == (1 if status == 400 else 3)
    assert info.value.model == "fake-sub"
    assert info.value.__cause__ is not None
    if isinstance(info.value, LLMStatusError):
        assert info.value.status_code == status


@pytest.mark.anyio
async def test_timeout_raises_llm_timeout_error() -> None:
    with server({"kind": "text", "text": "late"}, {"delay_s": 5.0}) as fake:
        client = build_client(profile(fake.base_url, timeout_s=0.2, max_retries=1))
        try:
            with pytest.raises(LLMTimeoutError, match="timed out"):
                await client.complete(USER)
        finally:
            await client.aclose()
        assert fake.stats()["requests"] == 2  # the SDK retried the timeout once


@pytest.mark.anyio
async def test_unreachable_endpoint_raises_connection_error() -> None:
    from broker.redis_server import free_port

    client = build_client(profile(f"http://127.0.0.1:{free_port()}/v1", max_retries=0))
    try:
        with pytest.raises(LLMConnectionError):
            await client.complete(USER)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_empty_completion_is_a_response_error() -> None:
    with server({"kind": "text", "text": ""}) as fake:
        client = build_client(profile(fake.base_url))
        try:
            with pytest.raises(LLMResponseError, match="empty"):
                await client.complete(USER)
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_concurrency_is_bounded_by_the_profile() -> None:
    with server({"kind": "text", "text": "ok"}, {"delay_s": 0.1}) as fake:
        client = build_client(profile(fake.base_url, concurrency=3))
        try:
            results = await asyncio.gather(*(client.complete(USER) for _ in range(10)))
        finally:
            await client.aclose()
        assert len(results) == 10
        assert fake.stats()["max_in_flight"] == 3


@pytest.mark.anyio
async def test_concurrent_calls_each_record_their_own_usage() -> None:
    rules = [{"name": "len", "reply": {"kind": "echo_length", "scope": "message"}}]
    with FakeLLMServer(Scenario.model_validate({"name": "t", "rules": rules})) as fake:
        client = build_client(profile(fake.base_url))
        ledger = UsageLedger()

        async def one(i: int) -> Usage:
            done = await client.complete([{"role": "user", "content": "x" * (i * 40)}])
            ledger.record(usage=done.usage, model=done.model, depth=1, session_id=f"s{i % 2}")
            assert done.text == str(i * 40)
            return done.usage

        try:
            usages = await asyncio.gather(*(one(i) for i in range(1, 21)))
        finally:
            await client.aclose()
    total, expected = ledger.total(), sum(usages, Usage())
    # Calls finish (and are recorded) in any order: float sums of cost differ in the last bit.
    assert dataclasses.replace(total, cost_usd=0.0) == dataclasses.replace(expected, cost_usd=0.0)
    assert total.cost_usd == pytest.approx(expected.cost_usd, rel=1e-12)
    assert ledger.total().input_tokens == sum(i * 10 + 1 for i in range(1, 21))
    by_session = dict((k["session_id"], u) for k, u in ledger.totals(group_by=["session_id"]))
    assert by_session["s0"].calls == by_session["s1"].calls == 10


@pytest.mark.anyio
async def test_api_key_never_in_errors_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    # The server echoes a wrong key in its 401 body, as OpenAI does.
    with server({"kind": "text", "text": "ok"}, api_key="the-right-key") as fake:
        client = build_client(profile(fake.base_url, api_key_env="TEST_LLM_KEY"))
        try:
            with pytest.raises(LLMStatusError) as info:
                await client.complete(USER)
        finally:
            await client.aclose()
    error = info.value
    assert error.status_code == 401
    assert "Incorrect API key" in str(error)
    logging.getLogger("test").exception("task failed", exc_info=error)
    shown = "".join(traceback.format_exception(error))
    assert "Incorrect API key" in shown  # the chained SDK error is in the traceback...
    for text in (str(error), repr(error), error.message, repr(client), repr(client.profile), shown):
        assert SECRET not in text
    assert caplog.records  # the SDK and our client did log at DEBUG
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.__dict__)


@pytest.mark.anyio
async def test_api_key_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "the-right-key")
    with server({"kind": "text", "text": "ok"}, api_key="the-right-key") as fake:
        client = build_client(profile(fake.base_url, api_key_env="TEST_LLM_KEY"))
        try:
            assert (await client.complete(USER)).text == "ok"
        finally:
            await client.aclose()
