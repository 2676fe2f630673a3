"""Probes, as a tenant would try them: session metadata that reaches file names, shared keys
and the depth cap is refused at the wire (422), never stored or delivered to a poller."""

from __future__ import annotations

from typing import Any

import pytest

from rlm_wire import broker_models as p
from tests.support.brokers import assert_json_error, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

HOSTILE_METADATA: list[dict[str, Any]] = [
    {"run_id": "../../etc/cron.d/x"},  # a path out of the trajectory directory
    {"run_id": "/tmp/planted"},  # an absolute path
    {"run_id": "a" * 65},  # longer than any file name we make
    {"run_id": "run\nid"},  # a control character in a log line or key
    {"parent_request_id": "../x"},
    {"depth": -1},  # one more sub-RLM level than the operator's cap
    {"max_depth": 10_000},
    {"max_iterations": 0},
    {"environment": "../local"},
    {"budget": {"max_tokens": -5}},
    {"budget": {"max_cost_usd": "NaN"}},
    {"surprise": "x" * 100_000},  # free keys copied into every request
]


@pytest.mark.parametrize("metadata", HOSTILE_METADATA, ids=lambda m: next(iter(m)))
async def test_hostile_session_metadata_is_refused(
    broker_server: BrokerServer, metadata: dict[str, Any]
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, _):
        kwargs = {"json": {"metadata": metadata}}
        await assert_json_error(broker_server.url, tenant.token, "POST", "/sessions", kwargs, 422)


async def test_well_formed_metadata_is_delivered_typed(broker_server: BrokerServer) -> None:
    metadata = {"run_id": "run-1.a_b", "depth": 1, "max_depth": 2, "environment": "pyodide"}
    async with tenant_and_session(
        broker_server.url, broker_server.admin_token, metadata=metadata
    ) as (tenant, session):
        await session.client.enqueue(p.LLMRequest(prompt="hi"), wait_s=0)
        (got,) = (await tenant.client.pending(wait_s=5)).requests
    assert got.metadata is not None
    assert (got.metadata.run_id, got.metadata.depth, got.metadata.environment) == (
        "run-1.a_b",
        1,
        "pyodide",
    )
