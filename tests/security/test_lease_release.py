"""Probes of `POST /leases/release`, as an attacker would try it: a poller hands back the
leases of calls it gave up, and the broker delivers those requests again at once. Another
tenant's token, a session token (sandboxed code holds one) or a hostile body must hand back
nothing: a lease handed back is a call paid twice.

Each probe ends with the owner's own release doing what the attacker's could not, so it
shows the release works (and fails where the broker has no such route).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceResponseError
from tests.support.brokers import assert_json_error, tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

#: Leases far longer than any test: a request seen again was handed back, not lapsed.
LEASE_S = 600.0
#: RLM_MAX_RESPOND_BATCH of these brokers: the most ids one release may name.
MAX_IDS = 4
#: Stands for the id of the request the test's poller holds, in a hostile body.
LEASED = "the-leased-request-id"


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerServer]) -> BrokerServer:
    return broker_factory(lease_s=LEASE_S, max_respond_batch=MAX_IDS)


async def test_another_tenant_cannot_hand_back_a_victims_lease(broker: BrokerServer) -> None:
    async with (
        tenant_and_session(broker.url, broker.admin_token, name="victim") as (victim, session),
        tenant_and_session(broker.url, broker.admin_token, name="attacker") as (attacker, _),
    ):
        queued = await session.client.enqueue(p.LLMRequest(prompt="secret"), wait_s=0)
        (leased,) = (await victim.client.pending(wait_s=5)).requests
        # The attacker names the victim's request (seen in a log or a proxy), alone, among
        # guesses, and as an id of its own tenant with the victim's suffix.
        forged = f"{attacker.tenant_id}.{queued.id.partition('.')[2]}"
        tried = await attacker.client.release_leases([queued.id, forged, "not-an-id"])
        assert [r.status for r in tried.results] == ["forbidden", "not_found", "not_found"]
        # Still leased to the victim's poller: nobody is given it again.
        assert (await victim.client.pending(wait_s=0.3)).requests == []
        # The victim's own poller hands it back: delivered again at once, its delivery
        # counted (the call ran).
        released = await victim.client.release_leases([leased.id])
        assert [r.status for r in released.results] == ["released"]
        (again,) = (await victim.client.pending(wait_s=5)).requests
        async with httpx2.AsyncClient(base_url=broker.url) as raw:
            metrics = (await raw.get("/metrics")).text
    assert (again.id, again.attempt) == (queued.id, 2)
    # Counted as every answer is, and only what was handed back.
    assert 'rlm_broker_http_requests_total{endpoint="release_leases",status="200"} 2.0' in metrics
    assert "rlm_broker_released_leases_total 1.0" in metrics


async def test_sandboxed_code_cannot_hand_back_its_own_requests(broker: BrokerServer) -> None:
    """The session token is in the sandbox: with it, guest code could make its own requests
    run again and again (each a paid call) by handing back what pollers are answering."""
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        queued = await session.client.enqueue(p.LLMRequest(prompt="run me twice"), wait_s=0)
        (leased,) = (await tenant.client.pending(wait_s=5)).requests
        with pytest.raises(ServiceResponseError) as refused:
            await session.client.release_leases([queued.id])
        assert refused.value.status == 403
        assert (await tenant.client.pending(wait_s=0.3)).requests == []
        # Answered, a request is no longer anyone's to hand back.
        await tenant.client.respond(p.Answer(id=leased.id, response="once"))
        after = await tenant.client.release_leases([leased.id])
    assert [r.status for r in after.results] == ["not_leased"]


async def test_another_tenants_lost_poll_hands_back_nothing_of_theirs(
    broker: BrokerServer,
) -> None:
    """`polls` reports long-polls whose answer was lost, as `/pending?abandoned=` does, and
    is scoped the same way: by the token that reports them."""
    async with (
        tenant_and_session(broker.url, broker.admin_token, name="victim") as (victim, session),
        tenant_and_session(broker.url, broker.admin_token, name="attacker") as (attacker, _),
        BrokerClient(broker.url, broker.admin_token) as admin,
    ):
        queued = await session.client.enqueue(p.LLMRequest(prompt="secret"), wait_s=0)
        (leased,) = (await victim.client.pending(wait_s=5, poll_id="victim-poll-0001")).requests
        for client in (attacker.client, admin):  # a tenant's poll is neither's to report
            tried = await client.release_leases([], polls=["victim-poll-0001"])
            assert (tried.results, tried.from_polls) == ([], 0)
        assert (await victim.client.pending(wait_s=0.3)).requests == []
        mine = await victim.client.release_leases([], polls=["victim-poll-0001"])
        assert mine.from_polls == 1
        (again,) = (await victim.client.pending(wait_s=5)).requests
    assert (again.id, again.attempt) == (queued.id, 2) and leased.id == queued.id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"ids": []}, 422),
        ({"ids": "r"}, 422),
        ({"ids": [1, 2]}, 422),
        ({"ids": [f"t.{i}" for i in range(MAX_IDS + 1)]}, 413),
        ({"id": "r"}, 422),
        ([], 422),
        ({"polls": []}, 422),
        ({"polls": ["short"]}, 400),
        ({"polls": ["../../etc/passwd"]}, 400),
        ({"polls": [f"poll-{i:010d}" for i in range(65)]}, 400),
        ({"polls": "victim-poll-0001"}, 422),
        ({"ids": [LEASED], "polls": ["short"]}, 400),
        ({"ids": [LEASED, LEASED, "t.1", "t.2", "t.3"]}, 413),
    ],
    ids=[
        "empty",
        "not-a-list",
        "not-strings",
        "too-many",
        "no-ids",
        "not-an-object",
        "no-polls",
        "short-poll",
        "path-poll",
        "too-many-polls",
        "polls-not-a-list",
        "the-lease-and-a-bad-poll",
        "the-lease-among-too-many",
    ],
)
async def test_hostile_release_bodies_are_refused(
    broker: BrokerServer, body: Any, expected: int
) -> None:
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        queued = await session.client.enqueue(p.LLMRequest(prompt="keep my lease"), wait_s=0)
        (leased,) = (await tenant.client.pending(wait_s=5)).requests
        body = json.loads(json.dumps(body).replace(LEASED, leased.id))
        await assert_json_error(
            broker.url, tenant.token, "POST", "/leases/release", {"json": body}, expected
        )
        # Nothing was handed back, not even a good id of a refused call: the lease is the
        # poller's until it says so.
        assert (await tenant.client.pending(wait_s=0.3)).requests == []
        released = await tenant.client.release_leases([leased.id])
    assert [r.status for r in released.results] == ["released"]
    assert queued.id == leased.id
