"""The "local" environment and the registry, against a real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from host_poller.environments import (
    EnvironmentSpec,
    EnvironmentStateError,
    UnknownEnvironmentError,
    create_environment,
    registered_environments,
)
from host_poller.environments.base import Environment
from host_poller.settings import HostSettings
from rlm_wire import broker_models as p
from rlm_wire.runtime_models import Limits
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def local_env(
    broker_server: BrokerServer,
    *,
    limits: Limits | None = None,
    state: dict[str, object] | None = None,
) -> AsyncIterator[Environment]:
    settings = HostSettings(broker_url=broker_server.url, environment="local")
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, sess):
        stop = asyncio.Event()

        async def answer() -> None:
            while not stop.is_set():
                batch = await tenant.client.pending(max_items=64, wait_s=0.2)
                if batch.requests:
                    await tenant.client.respond_batch(
                        [p.Answer(id=r.id, response=f"re:{r.prompt}") for r in batch.requests]
                    )

        task = asyncio.create_task(answer())
        env = create_environment("local", settings)
        await env.start(
            EnvironmentSpec(
                broker_url=broker_server.url,
                session_token=sess.token,
                depth=0,
                max_depth=1,
                limits=limits or Limits(),
                state=state,  # type: ignore[arg-type]
            )
        )
        try:
            yield env
        finally:
            await env.aclose()
            stop.set()
            await task


def test_local_is_registered_and_unknown_names_are_refused() -> None:
    assert "local" in registered_environments()
    with pytest.raises(UnknownEnvironmentError, match="nope"):
        create_environment("nope", HostSettings())


async def test_variables_persist_and_llm_query_goes_through_the_broker(
    broker_server: BrokerServer,
) -> None:
    async with local_env(broker_server, state={"k": 1}) as env:
        await env.load_context(["chunk one", "chunk two"])
        first = await env.execute("n = len(context)\nprint(llm_query('hi'))")
        second = await env.execute("state['n'] = n\nprint(n, SHOW_VARS())")
        assert first.stdout == "re:hi\n"
        assert first.error is None
        assert second.stdout.startswith("2 ")
        assert "n: int" in second.stdout
        assert await env.get_state() == {"k": 1, "n": 2}
        assert second.state == {"k": 1, "n": 2}


async def test_errors_output_caps_and_finals_are_reported(broker_server: BrokerServer) -> None:
    async with local_env(broker_server, limits=Limits(output_bytes=2048)) as env:
        failed = await env.execute("x = 1\nraise ValueError('bad')")
        assert failed.error is not None
        assert failed.error.type == "ValueError"
        assert 'File "<cell-1>", line 2' in (failed.error.traceback or "")
        flood = await env.execute("print('y' * 100_000)")
        assert len(flood.stdout) < 2200
        assert "output truncated" in flood.stdout
        none = await env.execute("answer['content'] = 'draft'")
        assert none.final is None
        ready = await env.execute("answer['ready'] = True")
        assert ready.final == {"value": "draft", "source": "answer"}


async def test_a_bad_state_is_an_error_and_the_last_good_state_is_kept(
    broker_server: BrokerServer,
) -> None:
    async with local_env(broker_server) as env:
        await env.execute("state['ok'] = 1")
        bad = await env.execute("state['bad'] = object()")
        assert bad.error is not None
        assert bad.error.type == "StateError"
        assert bad.state == {"ok": 1}


async def test_a_runaway_loop_is_interrupted_and_the_session_survives(
    broker_server: BrokerServer,
) -> None:
    async with local_env(broker_server) as env:
        await env.execute("before = 41")
        stuck = await env.execute("while True:\n    pass", timeout_s=0.3)
        assert stuck.error is not None
        assert stuck.error.type == "TimeoutError"
        after = await env.execute("print(before + 1)")
        assert after.stdout == "42\n"
        assert after.error is None


async def test_two_environments_capture_their_own_output(broker_server: BrokerServer) -> None:
    async with local_env(broker_server) as one, local_env(broker_server) as two:
        code = "import time\nfor i in range(20):\n    print('{}', i)\n    time.sleep(0.005)"
        first, second = await asyncio.gather(
            one.execute(code.format("one")), two.execute(code.format("two"))
        )
    assert first.stdout.count("one") == 20
    assert "two" not in first.stdout
    assert second.stdout.count("two") == 20
    assert "one" not in second.stdout


async def test_a_closed_environment_refuses_work(broker_server: BrokerServer) -> None:
    async with local_env(broker_server) as env:
        pass
    with pytest.raises(EnvironmentStateError):
        await env.execute("1")
