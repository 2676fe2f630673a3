"""The sandbox runtime service over real HTTP, with real Pyodide workers (and a real broker)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from rlm_wire import broker_models as bp
from rlm_wire import runtime_models as p
from rlm_wire.errors import ServiceResponseError
from rlm_wire.runtime_client import RuntimeClient
from sandbox_runtime.service.app import create_app
from sandbox_runtime.service.serve import BackgroundRuntime
from sandbox_runtime.service.settings import NO_BEARER_MESSAGE, RuntimeSettings
from sandbox_runtime.service.store import HibernationRefused, HibernationStore, StoreLimits
from sandbox_runtime.worker.launcher import network_namespace_available
from tests.sandbox_worker_helpers import child_pids
from tests.support.brokers import echo_answers, tenant_and_session
from tests.support.servers import BrokerServer, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "runtime-test-token"


@pytest.fixture(scope="module")
def runtime_url() -> Iterator[str]:
    """One runtime for the module: a pool of 2, no automatic hibernation."""
    settings = RuntimeSettings(
        token=TOKEN,
        pool_size=2,
        max_concurrent_spawns=2,
        hibernate_after_s=0,
        reaper_interval_s=0.2,
        max_body_bytes=64 * 1024,
        default_timeout_s=30,
        port=0,
    )
    with BackgroundRuntime(settings) as server:
        yield server.url


@pytest.fixture
async def client(runtime_url: str) -> AsyncIterator[RuntimeClient]:
    async with RuntimeClient(runtime_url, TOKEN) as runtime:
        yield runtime


async def _health(client: RuntimeClient) -> dict[str, Any]:
    return await client.health()


async def test_state_persists_across_executions(client: RuntimeClient) -> None:
    session = await client.create_session(p.CreateSession(setup_code="base = 40"))
    try:
        first = await client.execute(session.session_id, "x = base + 2\nprint('set')")
        assert first.error is None
        assert first.stdout == "set\n"
        second = await client.execute(session.session_id, "print(x)")
        assert second.stdout == "42\n"
        names = {v.name for v in await client.list_vars(session.session_id)}
        assert {"x", "base"} <= names
        await client.load_context(session.session_id, {"doc": "hello " * 1000})
        third = await client.execute(session.session_id, "print(len(context['doc']))")
        assert third.stdout == "6000\n"
    finally:
        await client.delete_session(session.session_id)
    with pytest.raises(ServiceResponseError) as info:
        await client.execute(session.session_id, "print(x)")
    assert info.value.status == 404


async def test_timeout_interrupts_a_busy_loop_and_keeps_variables(client: RuntimeClient) -> None:
    session = await client.create_session(p.CreateSession())
    try:
        await client.execute(session.session_id, "kept = 'yes'")
        result = await client.execute(session.session_id, "while True: pass", timeout_s=0.5)
        assert result.error is not None
        assert result.error.type == "TimeoutError"
        assert not result.state_lost
        after = await client.execute(session.session_id, "print(kept)")
        assert after.stdout == "yes\n"
    finally:
        await client.delete_session(session.session_id)


async def test_sessions_cannot_see_each_other(client: RuntimeClient) -> None:
    one = await client.create_session(p.CreateSession())
    two = await client.create_session(p.CreateSession())
    try:
        await client.execute(one.session_id, "secret = 'one'")
        seen = await client.execute(two.session_id, "print(secret)")
        assert seen.error is not None
        assert seen.error.type == "NameError"
        both = await asyncio.gather(
            client.execute(one.session_id, "import os; print(os.getpid(), secret)"),
            client.execute(two.session_id, "print('two')"),
        )
        assert both[0].stdout.endswith("one\n")
        assert both[1].stdout == "two\n"
    finally:
        await client.delete_session(one.session_id)
        await client.delete_session(two.session_id)


async def test_killed_worker_is_replaced_while_others_keep_working(
    client: RuntimeClient, runtime_url: str
) -> None:
    victim = await client.create_session(p.CreateSession(setup_code="ready = True"))
    bystander = await client.create_session(p.CreateSession())
    try:
        await client.execute(victim.session_id, "doomed = 1")
        await client.execute(bystander.session_id, "survivor = 2")
        info = await _session_info(runtime_url, victim.session_id)
        restarts_before = (await _health(client))["restarts"]
        os.kill(info["pid"], signal.SIGKILL)

        crashed = await client.execute(victim.session_id, "print('ran')")
        assert crashed.state_lost
        # This call meets the death, or the runtime saw the process end before it came (its
        # exit is noticed as it happens) and ran it on the replacement already.
        if crashed.error is not None:
            assert crashed.error.type == "SandboxCrashed"
        else:
            assert crashed.stdout == "ran\n"
        result = await client.execute(victim.session_id, "print(ready)")
        assert result.stdout == "True\n"  # the setup code ran again on the replacement
        assert not result.state_lost  # reported once, by the call that met the crash
        lost = await client.execute(victim.session_id, "print(doomed)")
        assert lost.error is not None
        assert lost.error.type == "NameError"
        assert (await _session_info(runtime_url, victim.session_id))["pid"] != info["pid"]

        kept = await client.execute(bystander.session_id, "print(survivor)")
        assert kept.stdout == "2\n"
        assert not kept.state_lost
        assert (await _health(client))["restarts"] == restarts_before + 1
    finally:
        await client.delete_session(victim.session_id)
        await client.delete_session(bystander.session_id)


async def test_hibernated_session_is_restored_on_execute(
    client: RuntimeClient, runtime_url: str
) -> None:
    session = await client.create_session(p.CreateSession(state={"step": 1}))
    try:
        code = "class Box:\n    def __init__(self, v): self.v = v\nbox = Box([1, 2, 3])\n"
        await client.execute(session.session_id, code + "def double(n): return 2 * n")
        async with _http(runtime_url) as http:
            response = await http.post(f"/sessions/{session.session_id}/hibernate")
        assert response.json() == {"hibernated": True}
        health = await _health(client)
        # /health lists the isolation layers in force, and what this machine cannot give.
        layers = health["isolation"]["layers"]
        assert layers["deno_permissions"]["active"]
        # FFI: for the C library alone, to map the snapshot, revoked before guest code.
        assert "revoked before guest code" in layers["deno_permissions"]["detail"]
        netns = network_namespace_available()
        assert layers["network_namespace"]["active"] is netns
        assert ("network_namespace" in health["isolation"]["missing"]) is not netns
        assert health["sessions"]["hibernated"] >= 1
        assert health["sessions"]["hibernated_bytes"] > 0
        assert (await _session_info(runtime_url, session.session_id))["status"] == "hibernated"

        result = await client.execute(
            session.session_id, "state['step'] += 1\nprint(double(sum(box.v)))"
        )
        assert result.error is None, result.error
        assert result.stdout == "12\n"
        assert result.state == {"step": 2}
        assert (await _session_info(runtime_url, session.session_id))["status"] == "live"
    finally:
        await client.delete_session(session.session_id)


async def test_hibernated_session_restores_into_a_warm_sandbox(
    client: RuntimeClient, runtime_url: str
) -> None:
    session = await client.create_session(p.CreateSession())
    try:
        await client.execute(session.session_id, "kept = 'warm'")
        async with _http(runtime_url) as http:
            await http.post(f"/sessions/{session.session_id}/hibernate")

        async def pool_full() -> bool:
            return bool((await _health(client))["pool"]["idle"] >= 1)

        await wait_until(pool_full, timeout_s=30)
        warm = child_pids()  # the runtime runs on a thread of this process
        result = await client.execute(session.session_id, "print(kept)")
        assert result.stdout == "warm\n"
        assert (await _session_info(runtime_url, session.session_id))["pid"] in warm
    finally:
        await client.delete_session(session.session_id)


async def test_stateless_execute_carries_variables_in_the_blob(client: RuntimeClient) -> None:
    first = await client.execute_stateless(
        p.StatelessExecuteRequest(
            code="total = sum(context)\nstate['seen'] = total",
            context=[1, 2, 3],
            state={"seen": 0},
        )
    )
    assert first.result.error is None
    assert first.result.state == {"seen": 6}
    assert base64.b64decode(first.snapshot)
    second = await client.execute_stateless(
        p.StatelessExecuteRequest(
            code="print(total * 2, len(context))", snapshot=first.snapshot, state={"seen": 6}
        )
    )
    assert second.result.error is None, second.result.error
    assert second.result.stdout == "12 3\n"
    with pytest.raises(ServiceResponseError) as info:
        await client.execute_stateless(p.StatelessExecuteRequest(code="1", snapshot="bm9wZQ=="))
    assert (info.value.status, info.value.code) == (400, "bad_snapshot")


async def test_http_errors_are_json(runtime_url: str) -> None:
    async with httpx2.AsyncClient(base_url=runtime_url) as anonymous:
        response = await anonymous.post("/sessions", json={})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert (await anonymous.get("/health")).status_code == 200
        metrics = await anonymous.get("/metrics")
        assert "rlm_sandbox_pool_idle" in metrics.text
    async with _http(runtime_url) as http:
        bad_json = await http.post("/sessions", content=b"{nope")
        assert (bad_json.status_code, bad_json.json()["error"]["code"]) == (400, "bad_request")
        unknown = await http.post("/sessions", json={"colour": "red"})
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "invalid_body")
        # A context must be a JSON string, array or object, on both routes that bind one.
        number = await http.post("/execute", json={"code": "1", "context": 42})
        assert (number.status_code, number.json()["error"]["code"]) == (422, "invalid_body")
        put_number = await http.put("/sessions/nope/context", content=b"42")
        assert (put_number.status_code, put_number.json()["error"]["code"]) == (
            422,
            "invalid_body",
        )
        missing = await http.post("/sessions/nope/execute", json={"code": "1"})
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
        huge = await http.post("/sessions", content=b" " * (65 * 1024))
        assert huge.status_code == 413
        no_route = await http.get("/nowhere")
        assert no_route.json()["error"]["code"] == "not_found"


async def test_llm_query_goes_through_the_broker(
    client: RuntimeClient, broker_server: BrokerServer
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, bs):
        access = p.BrokerAccess(url=broker_server.url, token=bs.token, depth=0, max_depth=1)
        session = await client.create_session(p.CreateSession(broker=access))
        stop = asyncio.Event()
        seen: list[bp.PendingRequest] = []
        poller = asyncio.create_task(echo_answers(tenant.client, seen, stop))
        try:
            code = (
                "one = llm_query('ping')\n"
                "many = llm_query_batched(['a', 'b', 'c'])\n"
                "try:\n    rlm_query('deeper')\nexcept LLMQueryError as exc:\n"
                "    refused = str(exc)\n"
                "print(one, many)"
            )
            result = await client.execute(session.session_id, code)
            assert result.error is None, result.error
            assert result.stdout == "echo:ping ['echo:a', 'echo:b', 'echo:c']\n"
            refused = await client.execute(session.session_id, "print(refused)")
            assert "rlm_query is not allowed" in refused.stdout
            assert {r.prompt for r in seen} == {"ping", "a", "b", "c"}
            assert all(r.depth == 1 and r.params == {"kind": "llm"} for r in seen)
        finally:
            stop.set()
            await poller
            await client.delete_session(session.session_id)


async def test_blocking_llm_query_times_out(
    client: RuntimeClient, broker_server: BrokerServer
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (_, bs):
        access = p.BrokerAccess(url=broker_server.url, token=bs.token)
        session = await client.create_session(p.CreateSession(broker=access))
        try:
            await client.execute(session.session_id, "before = 'kept'")
            result = await client.execute(session.session_id, "llm_query('hello?')", timeout_s=1)
            assert result.error is not None
            assert result.error.type == "TimeoutError"
            after = await client.execute(session.session_id, "print(before)")
            assert after.stdout == "kept\n"
        finally:
            await client.delete_session(session.session_id)


def _http(runtime_url: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=runtime_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )


async def _session_info(runtime_url: str, session_id: str) -> dict[str, Any]:
    async with _http(runtime_url) as http:
        response = await http.get(f"/sessions/{session_id}")
        response.raise_for_status()
        info: dict[str, Any] = response.json()
        return info


def test_the_app_is_not_built_without_a_token() -> None:
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ValueError, match="RLM_SANDBOX_TOKEN is required"):
            create_app(RuntimeSettings(host=host))
    with pytest.raises(ValueError, match="RLM_SANDBOX_TOKEN is required"):
        create_app(RuntimeSettings(token="  "))


async def test_idle_sessions_end_after_their_ttl(client: RuntimeClient) -> None:
    session = await client.create_session(p.CreateSession(limits=p.Limits(idle_ttl_s=0.3)))
    await client.execute(session.session_id, "x = 1")

    async def ended() -> bool:
        try:
            await client.list_vars(session.session_id)
        except ServiceResponseError as exc:
            return exc.status == 404
        return False

    await wait_until(ended, timeout_s=10, interval_s=0.5)


async def test_idle_sessions_hibernate_to_disk_and_come_back(tmp_path: Path) -> None:
    settings = RuntimeSettings(
        token=TOKEN,
        port=0,
        pool_size=0,
        hibernate_after_s=0.3,
        reaper_interval_s=0.1,
        hibernation_dir=tmp_path,
        hibernation_memory_bytes=0,  # every blob to a file
    )
    with BackgroundRuntime(settings) as runtime:
        async with RuntimeClient(runtime.url, TOKEN) as client:
            session = await client.create_session(p.CreateSession())
            await client.execute(session.session_id, "import math\nr = math.sqrt(81)")

            async def hibernated() -> bool:
                return bool((await client.health())["sessions"]["hibernated"] == 1)

            await wait_until(hibernated, timeout_s=10)
            [blob] = _blobs(tmp_path)
            # Private to the runtime's user: a directory of this process, 0700; files 0600.
            assert blob.parent.stat().st_mode & 0o777 == 0o700
            assert blob.stat().st_mode & 0o777 == 0o600
            assert (await client.health())["sessions"]["hibernated_spilled_bytes"] > 0
            result = await client.execute(session.session_id, "print(int(r))")
            assert result.stdout == "9\n"
            await client.delete_session(session.session_id)
            assert not _blobs(tmp_path)
    assert not _spill_dirs(tmp_path)  # removed at stop


def _blobs(directory: Path) -> list[Path]:
    return list(directory.glob("hibernation-*/*.blob"))


def _spill_dirs(directory: Path) -> list[Path]:
    return list(directory.glob("hibernation-*"))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_cli_refuses_to_start_without_a_token(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    from click.testing import CliRunner

    from rlm_cli.sandbox_commands import commands

    monkeypatch.delenv("RLM_SANDBOX_TOKEN", raising=False)
    (command,) = commands
    outcome = CliRunner().invoke(command, ["--host", host, "--port", "0"])
    assert outcome.exit_code == 1
    assert outcome.output.strip().splitlines() == [f"Error: {NO_BEARER_MESSAGE}"]


async def test_crashed_session_comes_back_from_its_last_hibernation(
    client: RuntimeClient, runtime_url: str
) -> None:
    session = await client.create_session(p.CreateSession())
    try:
        await client.execute(session.session_id, "saved = 'in the blob'")
        async with _http(runtime_url) as http:
            await http.post(f"/sessions/{session.session_id}/hibernate")
        await client.execute(session.session_id, "later = 'not in the blob'")
        os.kill((await _session_info(runtime_url, session.session_id))["pid"], signal.SIGKILL)
        crashed = await client.execute(session.session_id, "pass")
        assert crashed.state_lost
        back = await client.execute(session.session_id, "print(saved, 'later' in globals())")
        assert back.stdout == "in the blob False\n"
    finally:
        await client.delete_session(session.session_id)


async def test_the_store_spills_past_its_memory_budget_and_refuses_past_its_caps(
    tmp_path: Path,
) -> None:
    limits = StoreLimits(max_blob_bytes=1000, memory_bytes=1500, disk_bytes=1500)
    store = HibernationStore(limits, tmp_path / "spill")
    await store.put("a", b"a" * 1000)
    await store.put("b", b"b" * 1000)  # past the memory budget: to a file
    assert (store.memory_bytes, store.disk_bytes) == (1000, 1000)
    with pytest.raises(HibernationRefused, match="per-session limit"):
        await store.put("c", b"c" * 1001)
    with pytest.raises(HibernationRefused, match="no room"):
        await store.put("c", b"c" * 600)
    await store.put("b", b"B" * 400)  # replacing a blob frees its room first: now in memory
    assert (store.memory_bytes, store.disk_bytes) == (1400, 0)
    await store.put("c", b"c" * 600)
    assert await store.get("a") == b"a" * 1000
    assert await store.get("b") == b"B" * 400
    assert await store.get("c") == b"c" * 600
    assert store.directory is not None and store.directory.stat().st_mode & 0o777 == 0o700
    assert [p.stat().st_mode & 0o777 for p in store.directory.iterdir()] == [0o600]
    await store.delete("c")
    assert store.total_bytes == 1400 and await store.get("c") is None
    await store.aclose()
    assert not (tmp_path / "spill").exists() or not list((tmp_path / "spill").iterdir())
