"""Probes of `/pending?abandoned=`, as an attacker would try them: a poller reports long-polls
whose answer it never got, and the broker hands back at once what they still hold. Another
tenant's poll id (seen on the wire, or reused) must hand back nothing of theirs; a lease
its poller has since extended, or that was delivered again, must stay where it is.

Each probe ends with the owner's own report doing what the attacker's could not, so it
shows the report works (and fails where the broker does not know reports at all).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import Tenant, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

#: Leases far longer than any test: a request seen again was handed back, not lapsed.
LEASE_S = 600.0

VICTIM_POLL = "victim-poll-0001"


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerServer]) -> BrokerServer:
    return broker_factory(lease_s=LEASE_S)


@asynccontextmanager
async def victim_and_attacker(
    broker: BrokerServer,
) -> AsyncIterator[tuple[Tenant, BrokerClient, BrokerClient]]:
    """(the victim tenant, a session of it, a client holding another tenant's token)."""
    async with (
        tenant_and_session(broker.url, broker.admin_token, name="victim") as (victim, session),
        tenant_and_session(broker.url, broker.admin_token, name="attacker") as (attacker, _),
    ):
        yield victim, session.client, attacker.client


async def _enqueue(session: BrokerClient, *prompts: str) -> list[str]:
    batch = await session.enqueue_batch([p.LLMRequest(prompt=x) for x in prompts], wait_s=0)
    return [r.id for r in batch.results]


async def _poll(
    client: BrokerClient, poll_id: str, abandoned: list[str] | None = None, wait_s: float = 0
) -> list[p.PendingRequest]:
    batch = await client.pending(
        max_items=8, wait_s=wait_s, poll_id=poll_id, abandoned=abandoned or []
    )
    return batch.requests


async def test_another_tenants_poll_id_hands_back_nothing_of_theirs(broker: BrokerServer) -> None:
    async with victim_and_attacker(broker) as (victim, session, attacker):
        (request_id,) = await _enqueue(session, "secret")
        (leased,) = await _poll(victim.client, VICTIM_POLL, wait_s=5)
        assert leased.id == request_id
        # The attacker replays the victim's poll id (seen in a log, a proxy, a URL) with its
        # own token, as its own poll id, and alone and among guesses.
        for abandoned in ([VICTIM_POLL], ["guess-0000000001", VICTIM_POLL]):
            assert await _poll(attacker, VICTIM_POLL, abandoned) == []
        # Still leased to the victim: nobody is given it again.
        assert await _poll(victim.client, "victim-poll-0002") == []
        # The victim's own report hands it back, to its next long-poll.
        (again,) = await _poll(victim.client, "victim-poll-0003", [VICTIM_POLL], wait_s=5)
    assert (again.id, again.attempt) == (request_id, 2)


async def test_a_tenant_token_cannot_hand_back_what_an_admin_poll_leased(
    broker: BrokerServer,
) -> None:
    """A tenant whose requests an admin poller serves learns the admin's poll id: its
    report names its own polls only, never the admin's (an admin's polls are scoped apart)."""
    async with (
        victim_and_attacker(broker) as (tenant, session, _),
        BrokerClient(broker.url, broker.admin_token) as admin,
    ):
        (request_id,) = await _enqueue(session, "served by the operator")
        (leased,) = await _poll(admin, "admin-poll-00001", wait_s=5)
        assert leased.id == request_id
        assert await _poll(tenant.client, "tenant-poll-0001", ["admin-poll-00001"]) == []
        assert await _poll(admin, "admin-poll-00002") == []
        (again,) = await _poll(admin, "admin-poll-00003", ["admin-poll-00001"], wait_s=5)
    assert (again.id, again.attempt) == (request_id, 2)


async def test_a_delivered_then_extended_lease_is_not_handed_back(broker: BrokerServer) -> None:
    """A poller that extends a lease has the request, whatever it reports about the
    long-poll that delivered it: only the lease it never extended comes back."""
    async with victim_and_attacker(broker) as (victim, session, _):
        kept_id, lost_id = await _enqueue(session, "kept", "lost")
        delivered = await _poll(victim.client, VICTIM_POLL, wait_s=5)
        assert sorted(r.id for r in delivered) == sorted([kept_id, lost_id])
        extended = await victim.client.extend_leases([kept_id])
        assert extended.results[0].status == "extended"
        (again,) = await _poll(victim.client, "victim-poll-0002", [VICTIM_POLL], wait_s=5)
        assert (again.id, again.attempt) == (lost_id, 2)
        accepted = await victim.client.respond(p.Answer(id=kept_id, response="kept"))
    assert accepted.status == "accepted"


async def test_a_repeated_report_hands_back_nothing_delivered_since(broker: BrokerServer) -> None:
    """A report retried (its own answer was lost too) must not take the request from the
    long-poll that got it after the first report."""
    async with victim_and_attacker(broker) as (victim, session, _):
        (request_id,) = await _enqueue(session, "once")
        await _poll(victim.client, VICTIM_POLL, wait_s=5)
        (again,) = await _poll(victim.client, "victim-poll-0002", [VICTIM_POLL], wait_s=5)
        assert again.id == request_id
        assert await _poll(victim.client, "victim-poll-0003", [VICTIM_POLL]) == []
        assert await _poll(victim.client, "victim-poll-0004") == []


@pytest.mark.parametrize(
    "query",
    [
        {"poll": "short"},
        {"poll": "x" * 65},
        {"poll": "../../etc/passwd"},
        {"poll": "poll id with spaces"},
        {"poll": "pöll-id-000001"},
        {"poll": "*"},
        {"abandoned": "victim-poll-0001,*"},
        {"abandoned": "victim-poll-0001,,victim-poll-0002"},
        {"abandoned": ",".join(f"poll-{i:010d}" for i in range(65))},
        {"abandoned": "x" * 10_000},
    ],
    ids=lambda q: f"{next(iter(q))}={next(iter(q.values()))[:20]}",
)
async def test_hostile_poll_ids_are_refused(broker: BrokerServer, query: dict[str, Any]) -> None:
    async with (
        victim_and_attacker(broker) as (victim, _, _),
        httpx2.AsyncClient(base_url=broker.url) as raw,
    ):
        response = await raw.get(
            "/pending",
            params={"wait": 0, **query},
            headers={"Authorization": f"Bearer {victim.token}"},
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_poll_id"
    assert error["message"]
