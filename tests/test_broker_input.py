"""Bad input gets a clear 4xx JSON error, never a 500 or a traceback, and loses nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from rlm_wire import broker_models as p
from tests.support.brokers import Session, Tenant, assert_json_error, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def parties(
    broker_factory: Callable[..., BrokerServer],
) -> AsyncIterator[tuple[BrokerServer, Tenant, Session]]:
    broker = broker_factory(max_body_bytes=4096, max_enqueue_batch=3)
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        yield broker, tenant, session


CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    # (scope, method, path, request kwargs, expected status)
    ("session", "POST", "/enqueue", {"content": b"{not json"}, 400),
    ("session", "POST", "/enqueue", {"content": b""}, 400),
    ("session", "POST", "/enqueue", {"content": b"\xff\xfe"}, 400),
    ("session", "POST", "/enqueue", {"json": ["a", "list"]}, 422),
    ("session", "POST", "/enqueue", {"json": {"prompt": 42}}, 422),
    ("session", "POST", "/enqueue", {"json": {"prompt": "x", "surprise": 1}}, 422),
    (
        "session",
        "POST",
        "/enqueue",
        {"json": {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}},
        422,
    ),
    ("session", "POST", "/enqueue", {"json": {}}, 422),
    ("session", "POST", "/enqueue", {"json": {"prompt": "x", "depth": -1}}, 422),
    (
        "session",
        "POST",
        "/enqueue",
        {"json": {"messages": [{"role": "wizard", "content": "y"}]}},
        422,
    ),
    ("session", "POST", "/enqueue", {"json": {"batch": []}}, 422),
    ("session", "POST", "/enqueue", {"json": {"batch": [{"prompt": "x"}] * 4}}, 413),
    ("session", "POST", "/enqueue", {"json": {"prompt": "x" * 5000}}, 413),
    ("session", "POST", "/enqueue?wait=-1", {"json": {"prompt": "x"}}, 400),
    ("session", "POST", "/enqueue?wait=1e9", {"json": {"prompt": "x"}}, 400),
    ("session", "POST", "/enqueue?wait=nan", {"json": {"prompt": "x"}}, 400),
    ("session", "POST", "/enqueue?wait=soon", {"json": {"prompt": "x"}}, 400),
    ("tenant", "GET", "/pending?max=0", {}, 400),
    ("tenant", "GET", "/pending?max=-3", {}, 400),
    ("tenant", "GET", "/pending?max=100000", {}, 400),
    ("tenant", "GET", "/pending?max=2.5", {}, 400),
    ("tenant", "GET", "/pending?wait=-0.1", {}, 400),
    ("tenant", "GET", "/pending?wait=99999", {}, 400),
    ("tenant", "POST", "/respond", {"json": {"id": "x"}}, 422),
    (
        "tenant",
        "POST",
        "/respond",
        {"json": {"id": "x", "response": "a", "error": {"code": "c", "message": "m"}}},
        422,
    ),
    ("tenant", "POST", "/respond", {"json": {"id": "nope", "response": "a"}}, 404),
    ("tenant", "POST", "/respond", {"json": {"responses": [{"id": "x", "response": 1}]}}, 422),
    ("tenant", "POST", "/sessions", {"json": {"ttl_s": -5}}, 422),
    ("tenant", "POST", "/sessions", {"json": {"ttl_s": 10**9}}, 422),
    ("tenant", "POST", "/sessions", {"json": {"metadata": "not a dict"}}, 422),
    ("tenant", "DELETE", "/sessions/../../etc", {}, 404),
    ("tenant", "DELETE", "/sessions/s_0000000000000000", {}, 404),
    ("tenant", "GET", "/requests/not-an-id", {}, 404),
    ("tenant", "POST", "/leases/extend", {"json": {"ids": []}}, 422),
    ("admin", "POST", "/tenants", {"json": {"name": ""}}, 422),
    ("admin", "POST", "/tenants", {"json": {"name": "x", "plan": "gold"}}, 422),
    ("admin", "GET", "/no-such-endpoint", {}, 404),
    ("admin", "PUT", "/enqueue", {}, 405),
]


@pytest.mark.parametrize(("scope", "method", "path", "kwargs", "expected"), CASES)
async def test_bad_input_gets_a_json_4xx(
    parties: tuple[BrokerServer, Tenant, Session],
    scope: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    expected: int,
) -> None:
    broker, tenant, session = parties
    token = {"session": session.token, "tenant": tenant.token, "admin": broker.admin_token}[scope]
    await assert_json_error(broker.url, token, method, path, kwargs, expected)


async def test_bad_input_loses_nothing_already_accepted(
    parties: tuple[BrokerServer, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    queued = await session.client.enqueue(p.LLMRequest(prompt="keep me"), wait_s=0)
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        headers = {"Authorization": f"Bearer {session.token}"}
        for content in (b"{", b"[]", b'{"prompt": 1}'):
            assert (await raw.post("/enqueue", content=content, headers=headers)).status_code < 500
        # a batch with one bad answer is refused whole: the good one is not half-applied
        bad_batch = {"responses": [{"id": queued.id, "response": "ok"}, {"id": queued.id}]}
        tenant_headers = {"Authorization": f"Bearer {tenant.token}"}
        response = await raw.post("/respond", json=bad_batch, headers=tenant_headers)
        assert response.status_code == 422
    (request,) = (await tenant.client.pending(wait_s=5)).requests
    assert request.id == queued.id
    assert (await session.client.get_request(queued.id, wait_s=0)).status == "pending"


async def test_chunked_oversize_body_is_refused(
    parties: tuple[BrokerServer, Tenant, Session],
) -> None:
    broker, _, session = parties

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        response = await raw.post(
            "/enqueue", content=chunks(), headers={"Authorization": f"Bearer {session.token}"}
        )
    assert response.status_code == 413
