"""Run the scripted LLM: in a background thread for tests, or in the foreground for the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fake_llm.app import FakeLLMState, create_app
from fake_llm.scenario import Scenario, load_scenario
from rlm_wire.serving import FAKE_LLM_PORT, LoopServer, ThreadedServer, uvicorn_config

#: Delayed replies end early when their client disconnects; this bounds the rest.
_GRACEFUL_SHUTDOWN_S = 2
#: Clients under test may pause between requests; keep their connections.
_KEEP_ALIVE_S = 30


class FakeLLMSettings(BaseSettings):
    """Where `rlm fake-llm` and `rlm up` serve the scripted LLM; prefix RLM_FAKE_LLM_."""

    model_config = SettingsConfigDict(env_prefix="RLM_FAKE_LLM_", frozen=True, extra="ignore")

    port: int = Field(
        FAKE_LLM_PORT,
        ge=0,
        le=65535,
        description="Port of the scripted LLM of `rlm fake-llm` and `rlm up` (0: any free one).",
    )


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn_config(
        app,
        host,
        port,
        graceful_shutdown_s=_GRACEFUL_SHUTDOWN_S,
        keep_alive_s=_KEEP_ALIVE_S,
        log_level=log_level,
    )


def _as_scenario(scenario: Scenario | str | Path) -> Scenario:
    return scenario if isinstance(scenario, Scenario) else load_scenario(scenario)


class FakeLLMServer(ThreadedServer):
    """The scripted LLM on a loopback port, served from a daemon thread; a context manager.

    >>> with FakeLLMServer("count_words") as fake:
    ...     client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x")
    """

    def __init__(
        self, scenario: Scenario | str | Path, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.scenario = _as_scenario(scenario)
        self.state = FakeLLMState()
        self.app = create_app(self.scenario, self.state)
        super().__init__(
            _uvicorn_config(self.app, host, port, "warning"),
            name="fake-llm",
            start_timeout_s=10.0,
            stop_timeout_s=10.0,
        )

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (ends in /v1)."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        """Requests seen, rule hits, most requests in flight at once, failures injected."""
        return self.state.snapshot()


async def serve_forever(
    scenario: Scenario | str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "info",
    on_ready: Any = None,
) -> None:
    """Serve in the current event loop until SIGINT/SIGTERM; `on_ready(base_url)` once bound."""
    app = create_app(_as_scenario(scenario))
    server = LoopServer(
        _uvicorn_config(app, host, port, log_level), name="fake-llm", handle_signals=True
    )
    await server.start()
    if on_ready is not None:
        on_ready(f"{server.url}/v1")
    await server.wait()
