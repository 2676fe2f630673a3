"""Probes, as one tenant would try to take a shared broker for itself, with the broker's
default settings: open sessions without end, queue hundreds of MiB of prompts, flood it
with requests, bloat session metadata, and inflate /health's pollers count. Each is
answered with a clear refusal (429 `quota_exceeded` with `Retry-After`; 413/422 for a size)
and the other tenants are served as before."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from broker.settings import BrokerSettings
from rlm_wire import broker_models as p
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

DEFAULTS = BrokerSettings()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_quota(response: httpx2.Response) -> None:
    assert response.status_code == 429, response.text[:300]
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert int(response.headers["retry-after"]) >= 1


async def _another_tenant_is_served(broker: BrokerServer) -> None:
    async with tenant_and_session(broker.url, broker.admin_token, name="bystander") as (
        tenant,
        session,
    ):
        await session.client.enqueue(p.LLMRequest(prompt="still served?"), wait_s=0)
        (request,) = (await tenant.client.pending(wait_s=5)).requests
        assert request.prompt == "still served?"


async def test_a_tenant_cannot_open_1500_sessions(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, _):
        async with httpx2.AsyncClient(base_url=broker_server.url, timeout=30) as raw:

            async def open_one() -> httpx2.Response:
                return await raw.post("/sessions", json={}, headers=_auth(tenant.token))

            responses: list[httpx2.Response] = []
            for _ in range(1500 // 50):  # 50 at a time, as a hurried attacker would
                responses += await asyncio.gather(*(open_one() for _ in range(50)))
            opened = [r.json()["session_id"] for r in responses if r.status_code == 201]
            refused = [r for r in responses if r.status_code != 201]
            assert refused, "1500 sessions were opened for one tenant"
            for response in refused:
                _assert_quota(response)
            # One session was opened by tenant_and_session: the quota counts it too.
            assert len(opened) == DEFAULTS.tenant_max_sessions - 1
            # Closing one makes room for exactly one.
            closed = await raw.delete(f"/sessions/{opened[0]}", headers=_auth(tenant.token))
            assert closed.status_code == 200
            again = await raw.post("/sessions", json={}, headers=_auth(tenant.token))
            assert again.status_code == 201
            _assert_quota(await raw.post("/sessions", json={}, headers=_auth(tenant.token)))
    await _another_tenant_is_served(broker_server)


async def test_a_tenant_cannot_queue_430_mib_of_prompts(broker_server: BrokerServer) -> None:
    chunk = "x" * (15 * 2**20)  # under the 16 MiB body limit
    queued = 0
    refused: httpx2.Response | None = None
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (_, session):
        async with httpx2.AsyncClient(base_url=broker_server.url, timeout=60) as raw:
            while queued < 430 * 2**20:
                response = await raw.post(
                    "/enqueue",
                    params={"wait": 0},
                    json={"prompt": chunk},
                    headers=_auth(session.token),
                )
                if response.status_code != 202:
                    refused = response
                    break
                queued += len(chunk)
    assert refused is not None, f"{queued / 2**20:.0f} MiB of prompts were queued by one tenant"
    _assert_quota(refused)
    assert queued <= DEFAULTS.tenant_max_queued_bytes
    await _another_tenant_is_served(broker_server)


async def test_a_tenant_cannot_keep_more_requests_in_flight_than_its_quota(
    broker_server: BrokerServer,
) -> None:
    batch = {"batch": [{"prompt": "p"}] * DEFAULTS.max_enqueue_batch}
    accepted = 0
    refused: httpx2.Response | None = None
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, _):
        async with httpx2.AsyncClient(base_url=broker_server.url, timeout=60) as raw:
            # Several sessions, so the per-session limit is not what stops it.
            for _ in range(4):
                session = await tenant.client.create_session()
                for _ in range(DEFAULTS.max_open_per_session // DEFAULTS.max_enqueue_batch):
                    response = await raw.post(
                        "/enqueue", params={"wait": 0}, json=batch, headers=_auth(session.token)
                    )
                    if response.status_code != 202:
                        refused = response
                        break
                    accepted += len(batch["batch"])
                if refused is not None:
                    break
    assert refused is not None, f"{accepted} requests in flight for one tenant"
    _assert_quota(refused)
    assert accepted <= DEFAULTS.tenant_max_in_flight
    await _another_tenant_is_served(broker_server)


async def test_eight_mb_of_session_metadata_is_refused(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, _):
        bloated = [
            {"sub_model": "m", "notes": "x" * 8_000_000},
            {"sub_model": "m" * 8_000_000},
            {"run_id": "r" * 8_000_000},
        ]
        async with httpx2.AsyncClient(base_url=broker_server.url, timeout=30) as raw:
            for metadata in bloated:
                response = await raw.post(
                    "/sessions", json={"metadata": metadata}, headers=_auth(tenant.token)
                )
                assert response.status_code in (413, 422), response.status_code
                assert response.json()["error"]["code"] in ("payload_too_large", "invalid_body")


async def test_a_tenant_cannot_inflate_the_pollers_count(broker_server: BrokerServer) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, _):
        async with httpx2.AsyncClient(base_url=broker_server.url, timeout=30) as raw:
            names = [f"fake-poller-{i}" for i in range(300)] + ["x" * 10_000, "with\ttab"]

            async def poll(name: str) -> None:
                headers = {**_auth(tenant.token), "X-RLM-Poller": name}
                response = await raw.get("/pending", params={"wait": 0}, headers=headers)
                assert response.status_code == 200

            for start in range(0, len(names), 50):
                await asyncio.gather(*(poll(n) for n in names[start : start + 50]))
            health = (await raw.get("/health")).json()
    assert 1 <= health["pollers_last_minute"] <= DEFAULTS.max_pollers_per_tenant
