"""Small async helpers over BrokerClient for broker tests: a tenant, a session, a poller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient


@dataclass
class Tenant:
    tenant_id: str
    token: str
    client: BrokerClient


@dataclass
class Session:
    session_id: str
    token: str
    client: BrokerClient


@asynccontextmanager
async def tenant_and_session(
    url: str, admin_token: str, *, name: str = "acme", metadata: dict[str, object] | None = None
) -> AsyncIterator[tuple[Tenant, Session]]:
    async with BrokerClient(url, admin_token) as admin:
        created = await admin.create_tenant(name)
    async with BrokerClient(url, created.token) as tenant_client:
        session = await tenant_client.create_session(metadata=metadata)
        async with BrokerClient(url, session.token) as session_client:
            yield (
                Tenant(created.tenant_id, created.token, tenant_client),
                Session(session.session_id, session.token, session_client),
            )


async def answer_all(
    client: BrokerClient,
    reply: Callable[[p.PendingRequest], str] = lambda r: f"echo:{r.prompt}",
    *,
    stop: asyncio.Event,
    max_items: int = 64,
) -> int:
    """A minimal poller: drain and answer until `stop` is set; returns the count answered."""
    answered = 0
    while not stop.is_set():
        batch = await client.pending(max_items=max_items, wait_s=0.2)
        if batch.requests:
            answers = [p.Answer(id=r.id, response=reply(r)) for r in batch.requests]
            await client.respond_batch(answers)
            answered += len(answers)
    return answered


@asynccontextmanager
async def running_poller(
    client: BrokerClient, reply: Callable[[p.PendingRequest], str] = lambda r: f"echo:{r.prompt}"
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(answer_all(client, reply, stop=stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def echo_answers(
    client: BrokerClient, seen: list[p.PendingRequest], stop: asyncio.Event
) -> None:
    """A poller until `stop`: answers every request with `echo:<prompt>`, noting it in `seen`."""
    while not stop.is_set():
        batch = await client.pending(max_items=16, wait_s=0.2)
        if batch.requests:
            seen.extend(batch.requests)
            await client.respond_batch(
                [p.Answer(id=r.id, response=f"echo:{r.prompt}") for r in batch.requests]
            )


async def assert_json_error(
    url: str, token: str, method: str, path: str, kwargs: dict[str, Any], expected: int
) -> None:
    """Send one raw request; it must get `expected` with a JSON error body, no traceback."""
    async with httpx2.AsyncClient(base_url=url) as raw:
        response = await raw.request(
            method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
        )
    assert response.status_code == expected, response.text
    error = response.json()["error"]
    assert error["code"]
    assert error["message"]
    assert "Traceback" not in response.text
