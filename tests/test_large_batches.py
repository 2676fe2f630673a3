"""`llm_query_batched` of any size: the exec script and the sandbox runtime's bridge send a
batch in slices under the broker's bounds (1,024 requests, 16 MiB a body), so a batch larger
than either is answered in full instead of refused with 413 (against a real broker with its
default bounds, a stand-in poller answering)."""

from __future__ import annotations

import asyncio

import pytest

from rlm_repl import HttpTransport, RetryPolicy, batch_slices
from rlm_wire import broker_models as bp
from rlm_wire.runtime_models import BrokerAccess
from sandbox_runtime.service.bridge import BrokerBridge
from sandbox_runtime.worker import LLMCall
from tests.support.brokers import running_poller, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

MANY = 1_300  # over RLM_MAX_ENQUEUE_BATCH (1,024)
BIG = 3 * 2**20  # 6 prompts of 3 MiB: 18 MiB, over RLM_MAX_BODY_BYTES (16 MiB)


def _reply(request: bp.PendingRequest) -> str:
    prompt = request.prompt or ""
    return f"{len(prompt)}:{prompt[:8]}"


def _prompts() -> list[str]:
    small = [f"p{i:05d}" for i in range(MANY)]
    big = [f"b{i}".ljust(BIG, "x") for i in range(6)]
    return small + big


def test_slices_stay_under_both_bounds() -> None:
    sizes = [10] * 1000 + [3 * 2**20] * 3 + [20 * 2**20]
    slices = batch_slices(sizes)
    assert [i for part in slices for i in part] == list(range(len(sizes))), "order kept"
    for part in slices:
        assert len(part) <= 256
        assert len(part) == 1 or sum(sizes[i] for i in part) <= 4 * 2**20


async def test_the_exec_script_sends_a_batch_over_the_brokers_bounds(
    broker_server: BrokerServer,
) -> None:
    prompts = _prompts()
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, s):
        transport = HttpTransport(broker_server.url, s.token, wait_s=5, retry=RetryPolicy(5))
        calls = [{"prompt": prompt, "depth": 1, "params": {"kind": "llm"}} for prompt in prompts]
        try:
            async with running_poller(tenant.client, _reply):
                results = await asyncio.to_thread(transport.send, calls)
        finally:
            transport.close()
    assert [r["status"] for r in results] == ["done"] * len(prompts)
    assert [r["response"] for r in results] == [f"{len(p)}:{p[:8]}" for p in prompts]


async def test_the_runtime_bridge_sends_a_batch_over_the_brokers_bounds(
    broker_server: BrokerServer,
) -> None:
    prompts = _prompts()
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, s):
        bridge = BrokerBridge(
            BrokerAccess(url=broker_server.url, token=s.token, depth=0, max_depth=1),
            timeout_s=30,
            wait_s=5,
            retry=RetryPolicy(deadline_s=5),
        )
        call = LLMCall.model_validate({"kind": "llm", "prompts": prompts, "batched": True})
        try:
            async with running_poller(tenant.client, _reply):
                results = await bridge(call)
        finally:
            await bridge.aclose()
    assert [r.error for r in results] == [None] * len(prompts)
    assert [r.response for r in results] == [f"{len(p)}:{p[:8]}" for p in prompts]
