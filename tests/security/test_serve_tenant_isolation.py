"""Probes of `rlm serve` with tenant tokens as keys, as another tenant (or sandboxed code, or
a key guesser) would try them: read, follow or cancel a tenant's run; call the service
with a session token or the admin token; flood it with made-up keys to make it hammer the
broker. The service, its stack and the broker are real, over real HTTP.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx2
import pytest

from rlm_wire.broker_client import BrokerClient
from tests.test_serve_tenants import STATIC_KEY, TenantServe, tenant_serve

pytestmark = pytest.mark.anyio


def _assert_not_found(answer: httpx2.Response, run_id: str) -> None:
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["code"] == "not_found"
    assert error["message"] == f"no run {run_id!r}"  # the same as for a run that never was


async def test_tenant_b_cannot_read_follow_or_cancel_tenant_as_run(
    redis_url: str, tmp_path: Path
) -> None:
    async with tenant_serve(redis_url, tmp_path) as serve:
        _, token_a = await serve.tenant("tenant-a")
        _, token_b = await serve.tenant("tenant-b")
        run_id = await serve.start_run(token_a, sleep_s=1.5)  # still going while B pokes

        for key in (token_b, STATIC_KEY):
            _assert_not_found(await serve.request("GET", f"/v1/runs/{run_id}", key), run_id)
            events = await serve.request("GET", f"/v1/runs/{run_id}/events", key)
            _assert_not_found(events, run_id)
            cancel = await serve.request("POST", f"/v1/runs/{run_id}/cancel", key)
            _assert_not_found(cancel, run_id)
        never = "run-" + "0" * 32
        _assert_not_found(await serve.request("GET", f"/v1/runs/{never}", token_b), never)

        # B's cancel did nothing: A's run goes on to its answer, and A reads it.
        run = await serve.finished(token_a, run_id)
        assert run["status"] == "succeeded", run
        assert run["answer"] == "hi"
        # And A cannot read B's runs either.
        run_b = await serve.start_run(token_b)
        _assert_not_found(await serve.request("GET", f"/v1/runs/{run_b}", token_a), run_b)
        assert (await serve.finished(token_b, run_b))["status"] == "succeeded"


async def test_a_session_token_or_the_admin_token_is_no_key(redis_url: str, tmp_path: Path) -> None:
    """Sandboxed code holds its run's session token: it must not start runs of its own."""
    async with tenant_serve(redis_url, tmp_path) as serve:
        _, token = await serve.tenant("tenant-a")
        async with BrokerClient(serve.stack.broker_url, token) as tenant:
            session = await tenant.create_session()
        for key in (session.token, serve.stack.admin_token, token + "x", token[:-1]):
            answer = await serve.request("POST", "/v1/runs", key, {"query": "q", "context": "0"})
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["code"] == "unauthorized"
            assert "Traceback" not in answer.text


async def _tenant_checks(serve: TenantServe) -> int:
    """The broker's own count of the answers it gave to `DELETE /sessions/...`."""
    async with httpx2.AsyncClient() as client:
        metrics = (await client.get(f"{serve.stack.broker_url}/metrics")).text
    pattern = r'rlm_broker_http_requests_total\{endpoint="tenant_self",status="\d+"\} (\S+)'
    return sum(int(float(count)) for count in re.findall(pattern, metrics))


async def test_a_flood_of_made_up_keys_is_refused_without_a_storm_of_broker_calls(
    redis_url: str, tmp_path: Path
) -> None:
    async with tenant_serve(redis_url, tmp_path, tenant_checks_per_s=2) as serve:
        before = await _tenant_checks(serve)
        same = await asyncio.gather(
            *(serve.request("GET", "/v1/models", "rlm_t_guessed") for _ in range(40))
        )
        distinct = await asyncio.gather(
            *(serve.request("GET", "/v1/models", f"rlm_t_guess-{i}") for i in range(30))
        )
        statuses = [answer.status_code for answer in (*same, *distinct)]
        assert set(statuses) <= {401, 429}, statuses
        assert statuses[:40] == [401] * 40  # one key, one check: refused, remembered
        assert 429 in statuses[40:]  # past the rate, unknown keys are not even checked
        for answer in (*same, *distinct):
            assert answer.json()["error"]["code"] in ("unauthorized", "too_many_requests")
        checks = serve.service.auth.broker_checks
        assert await _tenant_checks(serve) - before == checks
        assert checks < 1 + 30
