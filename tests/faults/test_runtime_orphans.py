"""A sandbox runtime killed mid-run leaves no work to pay for.

Model code in Pyodide has 12 `llm_query_batched` prompts queued at the broker (no poller is
running) when the `rlm sandbox` process is SIGKILLed. The run fails, the host closes the
run's broker session, and the broker cancels what the dead sandbox had queued: a poller
started afterwards is handed none of it (before, 85 LLM calls were answered for dead
sandboxes in the fault runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from broker.redis_server import free_port
from fake_llm import FakeLLMServer
from host_poller.llm.client import build_client
from host_poller.rlm import RLM, RLMRunError
from host_poller.settings import HostSettings
from rlm_cli.scripted import scripted_profiles
from rlm_wire import broker_models as bp
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import answer_all
from tests.support.servers import BrokerServer, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

RUNTIME_TOKEN = "orphans-runtime-token-0123456789"
PROMPTS = 12
SCENARIO: dict[str, Any] = {
    "name": "orphans",
    "rules": [
        {
            "name": "root",
            "match": {},
            "reply": {
                "kind": "code",
                "code": [f"answers = llm_query_batched([f'q{{i}}' for i in range({PROMPTS})])"],
            },
        }
    ],
}


def _start_runtime(port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env |= {"RLM_SANDBOX_TOKEN": RUNTIME_TOKEN, "RLM_LOG_LEVEL": "WARNING"}
    rlm = Path(sys.executable).with_name("rlm")
    process = subprocess.Popen(
        [str(rlm), "sandbox", "--port", str(port), "--pool-size", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rlm sandbox exited with {process.returncode}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("rlm sandbox did not become ready")


async def test_a_killed_runtimes_queued_llm_queries_are_cancelled_not_paid(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    scenario = tmp_path / "orphans.json"
    scenario.write_text(json.dumps(SCENARIO))
    port = free_port()
    runtime = _start_runtime(port)
    try:
        async with BrokerClient(broker_server.url, broker_server.admin_token) as admin:
            tenant = await admin.create_tenant("orphans")
        with FakeLLMServer(scenario) as fake:
            root, _ = scripted_profiles(fake.base_url)
            client = build_client(root)
            settings = HostSettings(
                broker_url=broker_server.url,
                tenant_token=SecretStr(tenant.token),
                environment="pyodide",
                runtime_url=f"http://127.0.0.1:{port}",
                runtime_token=SecretStr(RUNTIME_TOKEN),
                trajectory_dir=tmp_path / "trajectories",
                broker_retry_deadline_s=2,
            )
            rlm = RLM(model=client, settings=settings, max_iterations=2)
            run = asyncio.create_task(rlm.acompletion("the context", "Ask twelve times"))

            async def queued() -> bool:
                health = await admin_health(broker_server)
                return bool(health["queues"]["pending"] >= PROMPTS)

            try:
                await wait_until(queued, timeout_s=120, interval_s=0.1)
                runtime.send_signal(signal.SIGKILL)
                runtime.wait(timeout=30)
                with pytest.raises(RLMRunError):
                    await asyncio.wait_for(run, timeout=90)
            finally:
                run.cancel()
                await client.aclose()
        # A poller that comes now finds nothing of the dead sandbox's to pay for.
        async with BrokerClient(broker_server.url, tenant.token) as tenant_client:
            stop = asyncio.Event()
            answering = asyncio.create_task(answer_all(tenant_client, stop=stop))
            await asyncio.sleep(2.0)
            stop.set()
            answered = await answering
        health = await admin_health(broker_server)
    finally:
        if runtime.poll() is None:
            runtime.kill()
    queues = bp.QueueDepths.model_validate(health["queues"])
    assert (answered, queues.pending, queues.leased) == (0, 0, 0), (answered, queues)


async def admin_health(broker: BrokerServer) -> dict[str, Any]:
    async with BrokerClient(broker.url, broker.admin_token) as admin:
        return await admin.health()
