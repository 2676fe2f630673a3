"""The runtime's bridge to a real broker: enqueue, re-wait, batches, errors, keep-alive."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from broker.app import create_app
from broker.redis_server import free_port
from broker.settings import BrokerSettings
from rlm_repl import RetryPolicy
from rlm_wire import broker_models as bp
from rlm_wire.runtime_models import BrokerAccess
from rlm_wire.serving import ThreadedServer, uvicorn_config
from sandbox_runtime.service.bridge import BrokerBridge
from sandbox_runtime.worker import LLMCall
from tests.support.brokers import running_poller, tenant_and_session
from tests.support.servers import ADMIN_TOKEN, BrokerServer

pytestmark = pytest.mark.anyio


def bridge(url: str, token: str, *, wait_s: float = 5.0) -> BrokerBridge:
    return BrokerBridge(
        BrokerAccess(url=url, token=token, depth=0, max_depth=2),
        timeout_s=10,
        wait_s=wait_s,
        retry=RetryPolicy(deadline_s=1.0, initial_s=0.01, max_pause_s=0.1),
    )


def call(*prompts: str, batched: bool = False, kind: str = "llm") -> LLMCall:
    return LLMCall.model_validate({"kind": kind, "prompts": list(prompts), "batched": batched})


@pytest.fixture
def short_keepalive_broker(redis_url: str) -> Iterator[str]:
    """The real broker, closing idle keep-alive connections after 1 s."""
    settings = BrokerSettings(redis_url=redis_url, admin_token=ADMIN_TOKEN)
    config = uvicorn_config(create_app(settings), "127.0.0.1", free_port(), keep_alive_s=1)
    with ThreadedServer(config, name="keepalive-broker") as server:
        yield server.url


async def test_single_batched_and_re_waited_calls(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, bs):
        link = bridge(broker_server.url, bs.token)
        try:
            async with running_poller(tenant.client):
                [one] = await link(call("ping"))
                many = await link(call("a", "b", "c", batched=True))
            assert (one.response, one.error) == ("echo:ping", None)
            assert [r.response for r in many] == ["echo:a", "echo:b", "echo:c"]

            # No poller within the long-poll: the answer comes by re-waiting on the request.
            short = bridge(broker_server.url, bs.token, wait_s=0.2)
            try:
                pending = asyncio.ensure_future(short(call("late", "later", batched=True)))
                await asyncio.sleep(0.6)
                assert not pending.done()
                async with running_poller(tenant.client):
                    late = await asyncio.wait_for(pending, 20)
                assert [r.response for r in late] == ["echo:late", "echo:later"]
            finally:
                await short.aclose()
        finally:
            await link.aclose()


async def test_broker_errors_become_error_results(broker_server: BrokerServer) -> None:
    refused = bridge(broker_server.url, "not-a-token")
    nowhere = bridge(f"http://127.0.0.1:{free_port()}", "token")
    try:
        [unauthorized] = await refused(call("hi"))
        assert unauthorized.response is None
        assert unauthorized.error is not None and unauthorized.error["code"] == "unauthorized"
        [unreachable] = await nowhere(call("hi"))
        assert unreachable.error is not None
        assert unreachable.error["code"] == "broker_unreachable"
    finally:
        await refused.aclose()
        await nowhere.aclose()


async def test_connections_closed_by_the_broker_are_replaced(
    short_keepalive_broker: str,
) -> None:
    async with tenant_and_session(short_keepalive_broker, ADMIN_TOKEN) as (tenant, bs):
        link = bridge(short_keepalive_broker, bs.token)
        try:
            async with running_poller(tenant.client):
                for prompt in ("first", "after-idle", "again"):
                    [result] = await link(call(prompt))
                    assert result.response == f"echo:{prompt}", result
                    await asyncio.sleep(1.5)  # past the broker's keep-alive: it closes
        finally:
            await link.aclose()


async def test_requests_carry_depth_kind_and_state(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, bs):
        link = bridge(broker_server.url, bs.token)
        seen: list[bp.PendingRequest] = []

        def reply(request: bp.PendingRequest) -> str:
            seen.append(request)
            return "ok"

        try:
            async with running_poller(tenant.client, reply):
                rlm = LLMCall.model_validate(
                    {"kind": "rlm", "prompts": ["sub"], "state": {"k": [1, 2]}}
                )
                [answer] = await link(rlm)
            assert answer.response == "ok"
            [request] = seen
            assert (request.depth, request.params, request.state) == (
                1,
                {"kind": "rlm"},
                {"k": [1, 2]},
            )
        finally:
            await link.aclose()
