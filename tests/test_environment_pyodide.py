"""The "pyodide" and "remote" environments against a real runtime, broker and scripted LLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from host_poller.environments import EnvironmentSpec, create_environment
from host_poller.environments.pyodide import SandboxRuntimeError
from host_poller.rlm import RLM
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig
from rlm_wire import broker_models as bp
from rlm_wire.runtime_models import Limits
from sandbox_runtime.service.serve import BackgroundRuntime
from sandbox_runtime.service.settings import RuntimeSettings
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

TOKEN = "env-runtime-token"


@pytest.fixture(scope="module")
def runtime_url() -> Iterator[str]:
    settings = RuntimeSettings(
        token=SecretStr(TOKEN), port=0, pool_size=1, max_concurrent_spawns=2, hibernate_after_s=0
    )
    with BackgroundRuntime(settings) as runtime:
        yield runtime.url


def _settings(runtime_url: str, **updates: Any) -> HostSettings:
    return HostSettings(runtime_url=runtime_url, runtime_token=SecretStr(TOKEN), **updates)


def _spec(broker_server: BrokerServer, token: str, **updates: Any) -> EnvironmentSpec:
    fields: dict[str, Any] = {
        "broker_url": broker_server.url,
        "session_token": token,
        "depth": 0,
        "max_depth": 1,
        "limits": Limits(timeout_s=20),
        "state": {"notes": []},
    }
    return EnvironmentSpec(**(fields | updates))


@pytest.mark.parametrize("name", ["pyodide", "remote"])
async def test_environment_runs_code_with_context_state_and_llm_query(
    name: str,
    runtime_url: str,
    broker_server: BrokerServer,
    broker_session: tuple[str, list[bp.PendingRequest]],
) -> None:
    token, seen = broker_session
    env = create_environment(name, _settings(runtime_url))
    await env.start(_spec(broker_server, token))
    try:
        await env.load_context({"title": "Moby Dick", "text": "whale " * 5000})
        first = await env.execute(
            "words = context['text'].split()\n"
            "reply = llm_query('how many? ' + str(len(words)))\n"
            "state['notes'].append(reply)\n"
            "print(context['title'])"
        )
        assert first.error is None, first.error
        assert first.stdout == "Moby Dick\n"
        assert first.state == {"notes": ["echo:how many? 5000"]}
        second = await env.execute("FINAL_VAR('reply')")
        assert second.final is not None
        assert second.final["value"] == "echo:how many? 5000"
        assert await env.get_state() == {"notes": ["echo:how many? 5000"]}
        assert [r.depth for r in seen] == [1]
    finally:
        await env.aclose()
        await env.aclose()  # a second close is harmless


async def test_pyodide_environment_needs_a_runtime_url() -> None:
    env = create_environment("pyodide", HostSettings(runtime_url=None))
    spec = EnvironmentSpec("http://127.0.0.1:9", "t", 0, 1, Limits(), None)
    with pytest.raises(SandboxRuntimeError, match="RLM_RUNTIME_URL"):
        await env.start(spec)


async def test_rlm_query_is_refused_at_max_depth(
    runtime_url: str,
    broker_server: BrokerServer,
    broker_session: tuple[str, list[bp.PendingRequest]],
) -> None:
    token, seen = broker_session
    env = create_environment("pyodide", _settings(runtime_url))
    await env.start(_spec(broker_server, token, depth=1, max_depth=2))
    try:
        result = await env.execute("rlm_query('go deeper')")
        assert result.error is not None
        assert result.error.type == "LLMQueryError"
        assert "not allowed" in result.error.message
        assert seen == []
    finally:
        await env.aclose()


async def test_scripted_rlm_query_end_to_end_in_pyodide(redis_url: str, tmp_path: Path) -> None:
    """Root LLM -> code in Pyodide -> llm_query_batched via runtime, broker, poller -> FINAL.

    The local stack starts its own sandbox runtime (the environment is pyodide and no
    RLM_RUNTIME_URL is set).
    """
    settings = HostSettings(environment="pyodide", runtime_url=None, trajectory_dir=tmp_path)
    config = StackConfig(redis_url=redis_url, scenario="count_words")
    context = {"part1": "the whale swam. " * 900, "part2": "a whale, another whale " * 700}
    async with LocalStack(config, rlm_stack_components(settings)) as stack:
        assert stack.environ()["RLM_RUNTIME_URL"] == stack.runtime_url
        client = root_client(stack)
        try:
            rlm = RLM(model=client, settings=host_settings_for(stack, settings))
            result = await rlm.acompletion(context, "How many times is the word 'whale' used?")
        finally:
            await client.aclose()
    assert result.answer == str(900 + 2 * 700)
    assert result.answer_source == "FINAL_VAR"
    assert result.trajectory_path is not None
    lines = result.trajectory_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert any(e.get("environment") == "pyodide" for e in events)
