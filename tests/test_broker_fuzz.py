"""Fuzzing the real broker with schemathesis, from its own `/openapi.json`.

For every operation, generated requests (schema-valid ones, and invalid ones) with every
token scope (and none) must never get a 5xx; every 4xx must be the JSON error body; every
answer must fit the document. Bounded and deterministic: derandomized Hypothesis, a fixed
number of examples, waits capped by the broker's settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from broker.openapi import build_openapi
from broker.settings import BrokerSettings
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.servers import BrokerServer

#: The broker under fuzz: waits short enough that a generated `wait` costs little, batch
#: limits small enough to be crossed.
FUZZ_SETTINGS: dict[str, Any] = {
    "max_wait_s": 0.05,
    "default_wait_s": 0.02,
    "default_pending_wait_s": 0.02,
    "work_recheck_s": 0.02,
    "max_enqueue_batch": 4,
    "max_respond_batch": 4,
    "max_pending_batch": 8,
    "max_open_per_session": 64,
    "max_body_bytes": 64 * 1024,
}
EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SCOPES = ("admin", "tenant", "session", "none")

# The operations, as the document lists them (built here only to name the tests).
_DOCUMENT = build_openapi(BrokerSettings(redis_url="redis://127.0.0.1:1", **FUZZ_SETTINGS))
CASES = [
    pytest.param(
        method.upper(),
        path,
        mode,
        tuple(spec.get("x-rlm-scopes", ["none"])),
        id=f"{method.upper()} {path} {mode.value}",
    )
    for path, item in _DOCUMENT["paths"].items()
    for method, spec in item.items()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    # an operation without inputs has nothing to get wrong
    if spec.get("parameters") or spec.get("requestBody") or mode.is_positive
]


@dataclass(frozen=True)
class Parties:
    """Tokens of every scope, and real ids for the path and query values."""

    tokens: dict[str, str]
    tenant_id: str
    spare_session_id: str  # DELETE may close this one; the fuzzing session stays open
    request_id: str


async def _parties(broker: BrokerServer) -> Parties:
    async with BrokerClient(broker.url, broker.admin_token) as admin:
        tenant = await admin.create_tenant("fuzz")
    async with BrokerClient(broker.url, tenant.token) as tenant_client:
        session = await tenant_client.create_session()
        spare = await tenant_client.create_session()
    async with BrokerClient(broker.url, session.token) as session_client:
        queued = await session_client.enqueue(p.LLMRequest(prompt="fuzz"), wait_s=0)
    return Parties(
        tokens={"admin": broker.admin_token, "tenant": tenant.token, "session": session.token},
        tenant_id=tenant.tenant_id,
        spare_session_id=spare.session_id,
        request_id=queued.id,
    )


@pytest.fixture
def fuzzed(
    broker_factory: Callable[..., BrokerServer],
) -> Iterator[tuple[BrokerServer, Parties, requests.Session]]:
    broker = broker_factory(**FUZZ_SETTINGS)
    parties = asyncio.run(_parties(broker))
    with requests.Session() as http:
        yield broker, parties, http


def _real_values(path: str, parties: Parties) -> dict[str, Any]:
    """Keywords of `as_strategy` that put real ids where the path has them."""
    if path == "/requests/{request_id}":
        return {"path_parameters": {"request_id": parties.request_id}}
    if path == "/sessions/{session_id}":
        return {
            "path_parameters": {"session_id": parties.spare_session_id},
            "query": {"tenant_id": parties.tenant_id},
        }
    return {}


def _check_error_body(response: schemathesis.Response) -> None:
    if 400 <= response.status_code < 500:
        assert response.headers["content-type"] == ["application/json"], response.text
        error = p.ErrorBody.model_validate_json(response.content).error
        assert error.code, response.text
        assert error.message, response.text


@pytest.mark.parametrize(("method", "path", "mode", "allowed"), CASES)
def test_fuzz_operation(
    fuzzed: tuple[BrokerServer, Parties, requests.Session],
    method: str,
    path: str,
    mode: schemathesis.GenerationMode,
    allowed: tuple[str, ...],
) -> None:
    broker, parties, http = fuzzed
    schema = schemathesis.openapi.from_url(
        f"{broker.url}/openapi.json", config=schemathesis.Config(), timeout=10
    )
    operation = schema[path][method]
    # Mostly the scopes the operation takes, so most requests get past authentication.
    scopes = st.one_of(st.sampled_from(allowed), st.sampled_from(SCOPES))
    strategies = [operation.as_strategy(generation_mode=mode)]
    if real := _real_values(path, parties):
        strategies.append(operation.as_strategy(generation_mode=mode, **real))
    checks = [*CHECKS, negative_data_rejection] if mode.is_negative else CHECKS

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=st.one_of(strategies), scope=scopes)
    def fuzz(case: schemathesis.Case[Any], scope: str) -> None:
        # The token goes into the case itself, so the checks know which request was sent.
        headers = CaseInsensitiveDict(case.headers or {})
        headers.pop("Authorization", None)
        if scope != "none":
            headers["Authorization"] = f"Bearer {parties.tokens[scope]}"
        case.headers = headers
        response = case.call(base_url=broker.url, session=http, timeout=10)
        case.validate_response(response, checks=checks)
        _check_error_body(response)

    fuzz()
