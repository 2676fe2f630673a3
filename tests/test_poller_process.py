"""`rlm poller` as a real process: SIGKILL mid-call (another poller answers after the lease)
and SIGTERM (in-flight calls finish and are answered before exit)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fake_llm import FakeLLMServer
from tests.support.servers import BrokerServer, wait_until
from tests.test_poller import (
    META,
    echo_scenario,
    enqueue_all,
    open_tenant_session,
    poller_of,
    poller_settings,
    results,
    running,
)


def log_events(path: Path) -> list[str]:
    return [
        json.loads(line)["event"] for line in path.read_text().splitlines() if line.startswith("{")
    ]


@pytest.mark.anyio
async def test_killed_poller_request_answered_by_another(
    broker_factory: Callable[..., BrokerServer], poller_process: Any
) -> None:
    broker = broker_factory(lease_s=1.0)
    with (
        FakeLLMServer(echo_scenario({"delay_s": 60})) as slow,
        FakeLLMServer(echo_scenario()) as fast,
    ):
        _, session = await open_tenant_session(broker.url, broker.admin_token, META)
        child = poller_process(broker.url, broker.admin_token, slow.base_url, RLM_POLLER_WAIT_S="2")
        ids = await enqueue_all(session, ["orphan"], depth=1)
        await wait_until(lambda: slow.stats()["in_flight"] == 1, timeout_s=30)
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait, 10)

        async with (
            session,
            poller_of(poller_settings(broker), fast.base_url) as poller,
            running(poller),
        ):
            [result] = await results(session, ids)
    assert result.status == "done"
    assert result.response == "echo: orphan"
    assert poller.stats.answered == 1
    assert fast.stats()["requests"] == 1


@pytest.mark.anyio
async def test_sigterm_finishes_in_flight_calls(
    broker_server: BrokerServer, poller_process: Any, tmp_path: Path
) -> None:
    with FakeLLMServer(echo_scenario({"delay_s": 1.0})) as fake:
        _, session = await open_tenant_session(broker_server.url, broker_server.admin_token, META)
        child = poller_process(
            broker_server.url, broker_server.admin_token, fake.base_url, RLM_POLLER_WAIT_S="2"
        )
        try:
            ids = await enqueue_all(session, ["finish me", "and me"], depth=1)
            await wait_until(lambda: fake.stats()["in_flight"] == 2, timeout_s=30)
            child.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(child.wait, 30)
            done = [await session.get_request(i, wait_s=0) for i in ids]
        finally:
            await session.aclose()
    assert code == 0
    assert [r.response for r in done] == ["echo: finish me", "echo: and me"]
    events = log_events(tmp_path / "poller-0.log")
    assert "poller stopping" in events
    assert events[-1] == "poller stopped"
    # It stopped leasing: only the two requests were ever sent to the LLM.
    assert fake.stats()["requests"] == 2
