"""Regressions from fuzzing the broker: inputs that got a 500 (or were let through) before.

Unicode digits in `max` (`"²".isdigit()` but `int("²")` fails), a 5000-digit `max` (past
Python's int parsing limit), lone surrogate escapes (parsed, then unencodable when stored),
JSON nested past the recursion limit, and NaN / Infinity (not JSON; stored, they reached
pollers as invalid JSON). And a 405 now says which methods are allowed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from broker.keys import is_session_id, is_tenant_id, tenant_of_request
from rlm_wire import broker_models as p
from tests.support.brokers import Session, Tenant, assert_json_error, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

ANY_ID = "t_0000000000000000.00000000000000000000"


@pytest.fixture
async def parties(
    broker_factory: Callable[..., BrokerServer],
) -> AsyncIterator[tuple[BrokerServer, Tenant, Session]]:
    broker = broker_factory(max_wait_s=1.0, default_wait_s=0.0, default_pending_wait_s=0.0)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        yield broker, tenant, session


CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    # (scope, method, path, request kwargs, expected status)
    ("tenant", "GET", "/pending?max=%C2%B2", {}, 400),  # "²"
    ("tenant", "GET", "/pending?max=%D9%A1", {}, 400),  # Arabic-Indic "1"
    ("tenant", "GET", "/pending?max=" + "9" * 5000, {}, 400),
    ("tenant", "GET", "/pending?max=0000000000000000001", {}, 400),
    ("session", "POST", "/enqueue?wait=%D9%A1", {"json": {"prompt": "x"}}, 400),
    ("session", "POST", "/enqueue", {"content": b'{"prompt": "\\ud800"}'}, 400),
    ("session", "POST", "/enqueue", {"content": b"[" * 5000 + b"]" * 5000}, 400),
    ("session", "POST", "/enqueue", {"content": b'{"prompt": "x", "state": {"a": NaN}}'}, 400),
    ("session", "POST", "/enqueue", {"content": b'{"prompt": "x", "params": {"a": 1e400}}'}, 422),
    ("tenant", "POST", "/sessions", {"content": b'{"metadata": {"a": Infinity}}'}, 400),
    ("tenant", "POST", "/sessions", {"content": b'{"metadata": {"a": [-1e400]}}'}, 422),
    (
        "tenant",
        "POST",
        "/respond",
        {"content": f'{{"id": "{ANY_ID}", "response": "r", "usage": {{"cost_usd": 1e400}}}}'},
        422,
    ),
]


@pytest.mark.parametrize(("scope", "method", "path", "kwargs", "expected"), CASES)
async def test_strict_input_gets_a_json_4xx(
    parties: tuple[BrokerServer, Tenant, Session],
    scope: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    expected: int,
) -> None:
    broker, tenant, session = parties
    token = {"session": session.token, "tenant": tenant.token}[scope]
    await assert_json_error(broker.url, token, method, path, kwargs, expected)


async def test_escaped_surrogate_pairs_are_still_text(
    parties: tuple[BrokerServer, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        response = await raw.post(
            "/enqueue?wait=0",
            content=b'{"prompt": "\\ud83d\\ude00"}',
            headers={"Authorization": f"Bearer {session.token}"},
        )
    assert response.status_code == 202, response.text
    (request,) = (await tenant.client.pending(wait_s=1)).requests
    assert request.prompt == "\N{GRINNING FACE}"


async def test_method_not_allowed_names_the_allowed_methods(
    parties: tuple[BrokerServer, Tenant, Session],
) -> None:
    broker, _, _ = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        response = await raw.put("/enqueue")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert p.ErrorBody.model_validate_json(response.content).error.code == "method_not_allowed"


def test_ids_match_whole() -> None:
    # `re.match` with `$` also accepted a trailing newline
    assert not is_tenant_id("t_0000000000000000\n")
    assert not is_session_id("s_0000000000000000\n")
    assert tenant_of_request(ANY_ID + "\n") is None
    assert tenant_of_request(ANY_ID) == "t_0000000000000000"
