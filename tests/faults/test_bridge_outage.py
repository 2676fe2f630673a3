"""The sandbox runtime's bridge rides out a broker restart: model code sees answers, not errors.

Before the one retry policy, the bridge retried only connection errors for ~0.35 s and turned
`503 redis_unavailable` into an `LLMQueryError`: a 5 s broker restart failed 84 of 360
`llm_query` calls. Here a real `rlm broker` process is SIGKILLed while calls are in flight
and started again on the same port a few seconds later, over the same Redis; every call must
be answered, each exactly once by the (stand-in) poller.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from rlm_repl import RetryPolicy
from rlm_wire import broker_models as bp
from rlm_wire.broker_client import BrokerClient
from rlm_wire.runtime_models import BrokerAccess
from sandbox_runtime.service.bridge import BrokerBridge
from sandbox_runtime.worker import LLMCall
from tests.support.brokers import echo_answers, tenant_and_session
from tests.support.servers import BrokerProcess, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

CALLS = 60
WORKERS = 4
OUTAGE_S = 3.0


async def test_a_broker_killed_and_restarted_loses_and_repeats_no_llm_query(
    redis_url: str,
) -> None:
    broker = BrokerProcess(redis_url).start()
    try:
        async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
            bridge = BrokerBridge(
                BrokerAccess(url=broker.url, token=session.token, depth=0, max_depth=2),
                timeout_s=5,
                wait_s=2,
                retry=RetryPolicy(deadline_s=60.0, initial_s=0.05, max_pause_s=0.5),
            )
            seen: list[bp.PendingRequest] = []
            stop = asyncio.Event()
            # The stand-in poller rides out the outage under the same policy as the real one.
            draining = BrokerClient(broker.url, tenant.token, retry=RetryPolicy(deadline_s=60))
            poller = asyncio.create_task(echo_answers(draining, seen, stop))
            prompts = asyncio.Queue[str]()
            for index in range(CALLS):
                prompts.put_nowait(f"p{index}")
            answers: dict[str, str | None] = {}
            errors: list[dict[str, str]] = []

            async def worker() -> None:
                while not prompts.empty():
                    prompt = prompts.get_nowait()
                    call = LLMCall.model_validate({"kind": "llm", "prompts": [prompt]})
                    [result] = await bridge(call)
                    answers[prompt] = result.response
                    if result.error is not None:
                        errors.append(result.error)

            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            try:
                await wait_until(lambda: len(answers) >= CALLS // 6, timeout_s=60)
                broker.kill()
                await asyncio.sleep(OUTAGE_S)
                broker.start()
                await asyncio.wait_for(asyncio.gather(*workers), timeout=90)
            finally:
                stop.set()
                await asyncio.wait_for(poller, timeout=30)
                await bridge.aclose()
                await draining.aclose()
    finally:
        broker.kill()

    accepted = len(answers)
    answered = sum(1 for prompt, response in answers.items() if response == f"echo:{prompt}")
    paid = Counter(request.prompt for request in seen)
    paid_twice = sum(count - 1 for count in paid.values() if count > 1)
    report = f"accepted {accepted} answered {answered} errors {errors[:3]} paid twice {paid_twice}"
    assert (accepted, answered, errors) == (CALLS, CALLS, []), report
    assert paid_twice == 0, report
