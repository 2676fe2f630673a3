"""BrokerClient: typed errors, retries of idempotent calls only."""

from __future__ import annotations

import pytest

from broker.redis_server import free_port
from rlm_repl import RetryPolicy
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio


async def test_an_unreachable_broker_raises_a_typed_error() -> None:
    retry = RetryPolicy(deadline_s=0.3, initial_s=0.01)
    async with BrokerClient(f"http://127.0.0.1:{free_port()}", "t", retry=retry) as client:
        with pytest.raises(ServiceUnreachable, match="GET /pending"):
            await client.pending(wait_s=0)
        with pytest.raises(ServiceUnreachable, match="POST /enqueue"):
            await client.enqueue(p.LLMRequest(prompt="x"), wait_s=0)


async def test_error_bodies_become_broker_response_errors(broker_server: BrokerServer) -> None:
    async with BrokerClient(broker_server.url, "wrong") as client:
        with pytest.raises(ServiceResponseError) as caught:
            await client.pending(wait_s=0)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert "unknown, revoked or expired" in caught.value.message
