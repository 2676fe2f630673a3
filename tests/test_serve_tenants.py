"""`rlm serve` with tenant tokens as keys: a tenant's runs are opened with its own token.

The service runs in this process over real HTTP, on a real local stack (Redis, broker, a
poller with sub-RLMs that answers every tenant, the scripted LLM), environment "local".
Tenants are created on the stack's broker with its admin token, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from broker.redis_server import free_port
from host_poller.llm.ledger import UsageLedger
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RunBudgets
from host_poller.service import RLMService, ServeSettings, create_app
from host_poller.service.auth import Authenticator
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components
from rlm_cli.stack import LocalStack, StackConfig
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ApiError
from rlm_wire.serving import LoopServer, uvicorn_config

pytestmark = pytest.mark.anyio

STATIC_KEY = "serve-static-key"
#: The root sleeps a little (so a run is still going when others poke at it), then makes
#: one sub-call, which the poller answers under the tenant whose session asked.
SCENARIO: dict[str, Any] = {
    "name": "tenant-run",
    "rules": [
        {
            "name": "root",
            "match": {"system": "You are the root of a Recursive Language Model"},
            "reply": {
                "kind": "code",
                "code": [
                    "import time",
                    "time.sleep(float(context))",
                    "FINAL(llm_query('say hello'))",
                ],
            },
        },
        {"name": "sub", "match": {"user": "^say hello"}, "reply": {"kind": "text", "text": "hi"}},
    ],
}


@dataclass
class TenantServe:
    """The service on its stack: call it with `request`, make tenants with `tenant`."""

    url: str
    stack: LocalStack
    service: RLMService
    ledger_path: Path
    http: httpx2.AsyncClient

    async def tenant(self, name: str) -> tuple[str, str]:
        """A new tenant of the stack's broker: (tenant id, tenant token)."""
        async with BrokerClient(self.stack.broker_url, self.stack.admin_token) as admin:
            created = await admin.create_tenant(name)
        return created.tenant_id, created.token

    async def request(
        self, method: str, path: str, key: str | None, body: Any = None
    ) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await self.http.request(method, path, headers=headers, json=body)

    async def start_run(self, key: str, sleep_s: float = 0.0) -> str:
        started = await self.request(
            "POST", "/v1/runs", key, {"query": "greet", "context": str(sleep_s)}
        )
        assert started.status_code == 202, started.text
        run_id: str = started.json()["id"]
        return run_id

    async def finished(self, key: str, run_id: str) -> dict[str, Any]:
        """The run once it is over (its events stream ends with it)."""
        events = await self.request("GET", f"/v1/runs/{run_id}/events", key)
        assert events.status_code == 200, events.text
        end = events.text.rsplit("event: end\ndata: ", 1)[1]
        run: dict[str, Any] = json.loads(end)
        return run

    def tenants_of(self, run_id: str) -> set[str | None]:
        """The tenants the poller metered the run's sub-calls to (its usage ledger)."""
        with UsageLedger(self.ledger_path) as ledger:
            rows = ledger.totals(group_by=["tenant_id"], run_id=run_id)
        return {keys["tenant_id"] for keys, _ in rows}


@asynccontextmanager
async def tenant_serve(redis_url: str, directory: Path, **serve: Any) -> AsyncIterator[TenantServe]:
    """`rlm serve` (static key STATIC_KEY, tenant tokens on, `serve` settings over them) on
    a local stack whose poller records its calls in a usage ledger."""
    scenario = directory / "tenant-run.json"
    scenario.write_text(json.dumps(SCENARIO))
    ledger = directory / "ledger.sqlite"
    host = HostSettings(environment="local", trajectory_dir=directory / "trajectories")
    budgets = RunBudgets()
    config = StackConfig(
        redis_url=redis_url,
        scenario=str(scenario),
        poller_settings=PollerSettings(poller_wait_s=0.5, poller_grace_s=2.0, ledger_path=ledger),
    )
    settings = ServeSettings(
        **{
            "api_keys": STATIC_KEY,
            "tenant_tokens": True,
            "allow_local_environment": True,
            **serve,
        }
    )
    async with LocalStack(config, rlm_stack_components(host, budgets=budgets)) as stack:
        assert stack.llm_settings is not None
        service = RLMService(
            settings, host_settings_for(stack, host), stack.llm_settings, budgets=budgets
        )
        app = create_app(service)
        server = LoopServer(uvicorn_config(app, "127.0.0.1", free_port(), graceful_shutdown_s=1))
        await server.start()
        try:
            async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:
                yield TenantServe(server.url, stack, service, ledger, http)
        finally:
            await server.stop()


async def test_a_tenant_tokens_run_is_the_tenants_and_a_static_keys_the_services(
    redis_url: str, tmp_path: Path
) -> None:
    async with tenant_serve(redis_url, tmp_path) as serve:
        tenant_id, token = await serve.tenant("acme")
        run_id = await serve.start_run(token)
        run = await serve.finished(token, run_id)
        assert run["status"] == "succeeded", run
        assert run["answer"] == "hi"
        # The run's sub-call was asked in the tenant's own session: metered to the tenant.
        assert serve.tenants_of(run["rlm"]["run_id"]) == {tenant_id}

        static_run = await serve.start_run(STATIC_KEY)
        static = await serve.finished(STATIC_KEY, static_run)
        assert static["status"] == "succeeded", static
        assert serve.tenants_of(static["rlm"]["run_id"]) == {serve.stack.tenant_id}

        # The chat API answers a tenant's token too.
        chat = await serve.request(
            "POST",
            "/v1/chat/completions",
            token,
            {"model": "rlm", "messages": [{"role": "user", "content": "greet"}], "context": "0"},
        )
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["choices"][0]["message"]["content"] == "hi"
        assert serve.tenants_of(body["rlm"]["run_id"]) == {tenant_id}


async def test_one_check_per_key_and_a_wrong_key_is_401(redis_url: str, tmp_path: Path) -> None:
    async with tenant_serve(redis_url, tmp_path) as serve:
        _, token = await serve.tenant("acme")
        answers = await asyncio.gather(
            *(serve.request("GET", "/v1/models", token) for _ in range(20))
        )
        assert {a.status_code for a in answers} == {200}
        assert serve.service.auth.broker_checks == 1  # concurrent checks of one key: one call

        wrong = await asyncio.gather(
            *(serve.request("GET", "/v1/models", "rlm_t_not-a-token") for _ in range(20))
        )
        for answer in wrong:
            assert answer.status_code == 401, answer.text
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["code"] == "unauthorized"
        assert serve.service.auth.broker_checks == 2  # the refusal is remembered too

        # A static key is never sent to the broker; no key at all is 401 without a check.
        assert (await serve.request("GET", "/v1/models", STATIC_KEY)).status_code == 200
        assert (await serve.request("GET", "/v1/models", None)).status_code == 401
        assert serve.service.auth.broker_checks == 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_checks_are_rate_bound_and_verdicts_expire(redis_url: str, tmp_path: Path) -> None:
    async with tenant_serve(redis_url, tmp_path) as serve:
        _, token = await serve.tenant("acme")
        clock = FakeClock()
        settings = ServeSettings(
            tenant_tokens=True, tenant_checks_per_s=2, tenant_cache_s=5, tenant_cache_entries=2
        )
        auth = Authenticator(settings, serve.stack.broker_url, timeout_s=5, clock=clock)
        try:
            await _rate_bound_and_expiry(auth, clock, token)
        finally:
            await auth.aclose()


async def _rate_bound_and_expiry(auth: Authenticator, clock: FakeClock, token: str) -> None:
    """Past RLM_SERVE_TENANT_CHECKS_PER_S unknown keys get 429; verdicts last their time."""
    statuses = []
    for index in range(6):  # distinct unknown keys: each needs the broker
        try:
            await auth.caller(f"Bearer unknown-{index}")
        except ApiError as exc:
            statuses.append(exc.status)
    assert statuses == [401, 401, 429, 429, 429, 429]
    assert auth.broker_checks == 2

    clock.now += 1.0  # two more checks a second
    caller = await auth.caller(f"Bearer {token}")
    assert caller.tenant_token is not None
    assert caller.tenant_token.get_secret_value() == token
    await auth.caller(f"Bearer {token}")
    assert auth.broker_checks == 3  # remembered
    assert auth.kept_verdicts == 2  # of three: the oldest was dropped (tenant_cache_entries)

    clock.now += 5.1  # the verdict expired: checked again
    await auth.caller(f"Bearer {token}")
    assert auth.broker_checks == 4


async def test_an_unreachable_broker_is_503_and_nothing_is_remembered() -> None:
    clock = FakeClock()
    settings = ServeSettings(tenant_tokens=True, tenant_checks_per_s=100)
    auth = Authenticator(settings, f"http://127.0.0.1:{free_port()}", timeout_s=2, clock=clock)
    try:
        for _ in range(2):
            with pytest.raises(ApiError) as caught:
                await auth.caller("Bearer some-token")
            assert caught.value.status == 503
            assert caught.value.headers == {"Retry-After": "1"}
        assert auth.broker_checks == 2
    finally:
        await auth.aclose()


def test_the_one_static_key_of_the_issue_is_an_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLM_SERVE_API_KEYS", raising=False)
    monkeypatch.setenv("RLM_SERVE_API_KEY", "single-key")
    assert ServeSettings().static_keys() == ("single-key",)
    monkeypatch.setenv("RLM_SERVE_API_KEYS", "a, b,single-key")
    assert ServeSettings().static_keys() == ("a", "b", "single-key")


def test_tenant_tokens_need_a_key_and_may_listen_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RLM_SERVE_API_KEYS", "RLM_SERVE_API_KEY", "RLM_SERVE_TENANT_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    ServeSettings(host="0.0.0.0", tenant_tokens=True).check("pyodide")
    with pytest.raises(ValueError, match="would answer anyone"):
        ServeSettings(host="0.0.0.0").check("pyodide")
    assert ServeSettings().is_open()
    assert not ServeSettings(tenant_tokens=True).is_open()
    with pytest.raises(ValueError, match="needs a broker"):
        Authenticator(ServeSettings(tenant_tokens=True), None, timeout_s=1)
