"""A standalone `rlm poller` process holding only the admin token: sub-RLMs for every tenant,
run budgets from session metadata, and its Prometheus endpoint.

The roots run in this process against the real broker; the poller is a real subprocess
running the real `SubRLMRunner` (environment "local") against the scripted LLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.redis_server import free_port
from fake_llm import FakeLLMServer, load_scenario
from host_poller.llm import build_client
from host_poller.rlm import RLM, RLMResult, RunBudgets, RunHooks, read_trajectory
from host_poller.settings import HostSettings
from rlm_cli.scripted import scripted_profiles
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import LLMRequest
from tests.support.servers import BrokerServer, wait_until
from tests.test_poller import echo_scenario
from tests.test_rlm import make_text

pytestmark = pytest.mark.anyio


class PollerProcess:
    """`rlm poller` as a child process with only the admin token and the scripted profiles."""

    def __init__(self, broker: BrokerServer, llm_base_url: str, tmp_path: Path, **env: str):
        root, sub = scripted_profiles(llm_base_url, max_retries=0)
        self.metrics_port = free_port()
        self.log_path = tmp_path / "poller.log"
        self.trajectory_dir = tmp_path / "poller-trajectories"
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith("RLM_")
        } | {
            "RLM_BROKER_URL": broker.url,
            "RLM_ADMIN_TOKEN": broker.admin_token,
            "RLM_LLM_PROFILES": json.dumps([root.model_dump(), sub.model_dump()]),
            "RLM_SUB_PROFILE": sub.name,
            "RLM_ENVIRONMENT": "local",
            "RLM_TRAJECTORY_DIR": str(self.trajectory_dir),
            "RLM_POLLER_WAIT_S": "1",
            "RLM_POLLER_GRACE_S": "5",
            "RLM_POLLER_METRICS_PORT": str(self.metrics_port),
            "RLM_POLLER_METRICS_HOST": "127.0.0.1",
            "RLM_LOG_LEVEL": "INFO",
            **env,
        }  # fmt: skip
        rlm = Path(sys.executable).with_name("rlm")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(rlm), "poller"], env=environ, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def ready(self) -> None:
        async def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"rlm poller exited:\n{self.log_path.read_text()}")
            try:
                async with httpx2.AsyncClient(timeout=2) as client:
                    return (await client.get(self.metrics_url)).status_code == 200
            except httpx2.TransportError:
                return False

        await wait_until(up, timeout_s=30, interval_s=0.1)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, by (name, sorted labels)."""
        async with httpx2.AsyncClient(timeout=5) as client:
            response = await client.get(self.metrics_url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


@pytest.fixture
def start_poller(tmp_path: Path) -> Iterator[Callable[..., PollerProcess]]:
    started: list[PollerProcess] = []

    def start(broker: BrokerServer, llm_base_url: str, **env: str) -> PollerProcess:
        poller = PollerProcess(broker, llm_base_url, tmp_path, **env)
        started.append(poller)
        return poller

    yield start
    for poller in started:
        poller.stop()


async def new_tenant(broker: BrokerServer, name: str) -> tuple[str, str]:
    async with BrokerClient(broker.url, broker.admin_token) as admin:
        created = await admin.create_tenant(name)
    return created.tenant_id, created.token


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


async def test_admin_poller_runs_depth_2_for_two_tenants(
    broker_server: BrokerServer,
    start_poller: Callable[..., PollerProcess],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="broker.routes_tenancy")
    with FakeLLMServer(load_scenario("depth2")) as fake:
        poller = start_poller(broker_server, fake.base_url)
        await poller.ready()
        root_profile, _ = scripted_profiles(fake.base_url, max_retries=0)
        root = build_client(root_profile)
        tenants = [await new_tenant(broker_server, name) for name in ("acme", "globex")]
        counts = [23, 17]

        async def run(token: str, count: int) -> RLMResult:
            settings = HostSettings(
                broker_url=broker_server.url,
                tenant_token=token,
                environment="local",
                trajectory_dir=tmp_path / "root-trajectories",
            )
            rlm = RLM(model=root, max_depth=2, settings=settings, hooks=RunHooks(RunBudgets()))
            text = make_text("whale", count, lines=600, seed=count)
            return await rlm.acompletion(text, "How often is the word 'whale' used?")

        try:
            results = await asyncio.gather(
                *(run(token, count) for (_, token), count in zip(tenants, counts, strict=True))
            )
        finally:
            await root.aclose()
        samples = await poller.metrics()
        llm_requests = fake.stats()["requests"]
        assert poller.stop() == 0

    assert [r.answer for r in results] == ["23", "17"]
    for result in results:
        assert result.stop_reason == "final"
        assert result.final_state == {"children": 2}, "each child bumped the shared state"
        # The children ran in the poller's process; their whole subtrees come back with
        # the answers, so the root's usage covers the run, at depths 0 and 1.
        assert set(result.usage_by_depth) == {0, 1}
    # Every LLM call the scripted LLM served is counted in exactly one run, once.
    assert sum(r.usage.calls for r in results) == llm_requests

    # Each tenant's root session and its two children's sessions were opened for it.
    opened = [
        str(getattr(r, "tenant_id", None))
        for r in caplog.records
        if r.getMessage() == "session created"
    ]
    assert sorted(opened) == sorted([tenant_id for tenant_id, _ in tenants] * 3)

    # The children wrote their trajectories in the poller's process, at depth 1, each
    # under its tenant's own directory.
    files = sorted(poller.trajectory_dir.glob("*/*.jsonl"))
    assert len(files) == 4
    assert sorted({f.parent.name for f in files}) == sorted(t for t, _ in tenants)
    run_ids = {r.run_id for r in results}
    assert {f.name.split(".d1.")[0] for f in files} == run_ids
    for path in files:
        events = read_trajectory(path)
        iterations = [e for e in events if e["event"] == "iteration"]
        assert [e["depth"] for e in iterations] == [1, 1]

    # The metrics endpoint saw it all: 4 rlm_query and the plain calls, all answered.
    root_calls = sum(r.usage_by_depth[0].calls for r in results)
    poller_llm_calls = total(samples, "rlm_poller_llm_calls_total", outcome="ok")
    assert poller_llm_calls == llm_requests - root_calls
    child_root_calls = 4 * 2
    plain_calls = poller_llm_calls - child_root_calls
    assert plain_calls >= 4
    done = total(samples, "rlm_poller_requests_total", outcome="done")
    assert done == 4 + plain_calls
    assert total(samples, "rlm_poller_requests_total", outcome="error") == 0
    assert total(samples, "rlm_poller_llm_call_seconds_count") == poller_llm_calls
    assert total(samples, "rlm_poller_llm_calls_total", model="fake-sub") == poller_llm_calls
    assert total(samples, "rlm_poller_llm_tokens_total", direction="input") > 0
    assert total(samples, "rlm_poller_llm_tokens_total", direction="output") > 0
    assert ("rlm_poller_llm_cost_usd_total", (("model", "fake-sub"),)) in samples
    assert total(samples, "rlm_poller_in_flight") == 0
    assert total(samples, "rlm_poller_requests_fetched_total") == 4 + plain_calls
    assert total(samples, "rlm_poller_broker_outages_total") == 0
    assert total(samples, "rlm_poller_broker_reachable") == 1


async def open_run_session(
    broker: BrokerServer, token: str, run_id: str, budget: dict[str, Any], **meta: Any
) -> tuple[str, BrokerClient]:
    metadata = {"run_id": run_id, "depth": 0, "max_depth": 2, "budget": budget, **meta}
    async with BrokerClient(broker.url, token) as tenant:
        session = await tenant.create_session(metadata=metadata)
    return session.session_id, BrokerClient(broker.url, session.token)


async def ask(session: BrokerClient, prompt: str, **fields: Any) -> tuple[str, str | None]:
    """One call through the broker: (status, response or error code)."""
    [result] = (
        await session.enqueue_batch([LLMRequest(prompt=prompt, **fields)], wait_s=20)
    ).results
    result = await session.wait_result(result, wait_s=20)
    if result.status == "done":
        return "done", result.response
    assert result.error is not None
    return result.status, result.error.code


async def test_admin_poller_enforces_budgets_from_session_metadata(
    broker_server: BrokerServer, start_poller: Callable[..., PollerProcess]
) -> None:
    with FakeLLMServer(echo_scenario()) as fake:
        poller = start_poller(broker_server, fake.base_url)
        await poller.ready()
        _, token = await new_tenant(broker_server, "acme")
        # Two sessions of one run share its sub-call budget; another run has its own.
        _, first = await open_run_session(broker_server, token, "run-a", {"max_sub_calls": 3})
        _, second = await open_run_session(broker_server, token, "run-a", {"max_sub_calls": 3})
        _, other = await open_run_session(broker_server, token, "run-b", {"max_sub_calls": 3})
        _, tokens = await open_run_session(broker_server, token, "run-c", {"max_tokens": 1})
        _, late = await open_run_session(
            broker_server, token, "run-d", {"max_seconds": 60}, run_started_at=time.time() - 120
        )
        clients = [first, second, other, tokens, late]
        try:
            shared = [
                await ask(first, "one"),
                await ask(second, "two"),
                await ask(first, "three"),
                await ask(second, "four"),
            ]
            separate = await ask(other, "five")
            by_tokens = [await ask(tokens, "six"), await ask(tokens, "seven")]
            by_time = await ask(late, "eight")
            # rlm_query counts too: the run's budget is spent, so no sub-RLM starts.
            refused_rlm = await ask(first, "nine", params={"kind": "rlm"}, depth=1)
        finally:
            for client in clients:
                await client.aclose()
        samples = await poller.metrics()
        assert poller.stop() == 0
        llm_requests = fake.stats()["requests"]

    assert shared == [
        ("done", "echo: one"),
        ("done", "echo: two"),
        ("done", "echo: three"),
        ("error", "budget_exceeded"),
    ]
    assert separate == ("done", "echo: five")
    assert by_tokens == [("done", "echo: six"), ("error", "budget_exceeded")]
    assert by_time == ("error", "budget_exceeded")
    assert refused_rlm == ("error", "budget_exceeded")
    assert llm_requests == 5
    assert total(samples, "rlm_poller_requests_total", code="budget_exceeded") == 4
    assert total(samples, "rlm_poller_requests_total", outcome="done") == 5
