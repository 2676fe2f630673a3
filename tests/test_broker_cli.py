"""`rlm broker` with no RLM_REDIS_URL starts an embedded Redis and stops it on exit;
`rlm tenant create` makes a tenant on a running broker; RLM_BROKER_PORT sets its port."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from broker.redis_server import free_port
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import running_poller
from tests.support.servers import BrokerProcess

pytestmark = pytest.mark.anyio


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_rlm_broker_runs_on_an_embedded_redis_and_stops_it(tmp_path: Path) -> None:
    broker = BrokerProcess(None, RLM_REDIS_DIR=str(tmp_path / "redis"))
    broker.start()
    try:
        (redis_pid,) = _children(broker.pid)
        assert "server" in _cmdline(redis_pid)
        async with BrokerClient(broker.url, None) as anonymous:
            health = await anonymous.health()
        assert health["status"] == "ok"
        assert health["redis"]["reachable"] is True

        rlm = Path(sys.executable).with_name("rlm")
        env = {
            **os.environ,
            "RLM_BROKER_URL": broker.url,
            "RLM_ADMIN_TOKEN": broker.admin_token,
        }
        created = await asyncio.to_thread(
            subprocess.run,
            [str(rlm), "tenant", "create", "from-cli"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        tenant = p.TenantCreated.model_validate(json.loads(created.stdout))
        async with BrokerClient(broker.url, tenant.token) as tenant_client:
            session = await tenant_client.create_session()
            async with (
                BrokerClient(broker.url, session.token) as session_client,
                running_poller(tenant_client),
            ):
                result = await session_client.enqueue(p.LLMRequest(prompt="hi"), wait_s=10)
        assert result.response == "echo:hi"
    finally:
        broker.stop()
    assert broker.returncode == 0
    assert not _alive(redis_pid), "the embedded Redis outlived the broker"


def test_rlm_broker_listens_on_rlm_broker_port(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env |= {
        "RLM_BROKER_PORT": str(port),
        "RLM_LOG_LEVEL": "WARNING",
        "RLM_REDIS_DIR": str(tmp_path / "redis"),
    }
    rlm = Path(sys.executable).with_name("rlm")
    child = subprocess.Popen(
        [str(rlm), "broker"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            try:
                health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, "rlm broker never listened on RLM_BROKER_PORT"
                time.sleep(0.05)
        assert health.json()["status"] == "ok"
    finally:
        child.terminate()
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == 0, stderr.decode()[-2000:]
