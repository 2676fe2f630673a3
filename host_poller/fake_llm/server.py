"""Run the scripted LLM: in a background thread for tests, or in the foreground for the CLI."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from host_poller.fake_llm.app import FakeLLMState, create_app
from host_poller.fake_llm.scenario import Scenario, load_scenario

_START_TIMEOUT_S = 10.0


def _uvicorn_config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="off",
        ws="none",
        access_log=False,
        # Delayed replies end early when their client disconnects; this bounds the rest.
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )


def _bound_port(server: uvicorn.Server) -> int:
    for srv in server.servers:
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("uvicorn server has no listening socket")


def _as_scenario(scenario: Scenario | str | Path) -> Scenario:
    return scenario if isinstance(scenario, Scenario) else load_scenario(scenario)


class FakeLLMServer:
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
        self._host = host
        self._server = uvicorn.Server(_uvicorn_config(self.app, host, port, "warning"))
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:12345."""
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (ends in /v1)."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        """Requests seen, rule hits, most requests in flight at once, failures injected."""
        return self.state.snapshot()

    def start(self) -> FakeLLMServer:
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer already started")
        self._thread = threading.Thread(
            target=self._server.run, name=f"fake-llm-{self.scenario.name}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("fake LLM server exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake LLM server did not start in time")
            time.sleep(0.01)
        self.port = _bound_port(self._server)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=_START_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # raises the start-up error
            return
        await asyncio.sleep(0.01)
    if on_ready is not None:
        on_ready(f"http://{host}:{_bound_port(server)}/v1")
    await task
