"""Real servers for tests: the broker under uvicorn in a thread, or `rlm` subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx2

from broker.app import create_app
from broker.context import BrokerContext
from broker.redis_server import free_port
from broker.settings import BrokerSettings
from rlm_wire.serving import ThreadedServer, uvicorn_config

ADMIN_TOKEN = "test-admin-token"


class BrokerServer(ThreadedServer):
    """The real broker app on a real Redis, in this process."""

    def __init__(self, redis_url: str, port: int | None = None, **overrides: Any) -> None:
        self.settings = BrokerSettings(
            **{"redis_url": redis_url, "admin_token": ADMIN_TOKEN, **overrides}
        )
        self.admin_token = ADMIN_TOKEN
        config = uvicorn_config(
            create_app(self.settings), "127.0.0.1", port or free_port(), graceful_shutdown_s=1
        )
        super().__init__(config, name="test-broker")


class InspectableBroker(BrokerServer):
    """The real broker in this process, whose in-process state a test may read."""

    @property
    def context(self) -> BrokerContext:
        app: Any = self._server.config.app
        return cast(BrokerContext, app.state.broker)


class BrokerProcess:
    """`rlm broker` as a child process, so a test can SIGKILL it and start it again."""

    def __init__(self, redis_url: str | None, port: int | None = None, **env: str) -> None:
        """`redis_url` None: no RLM_REDIS_URL, so `rlm broker` starts an embedded Redis."""
        self.port = port or free_port()
        self.admin_token = ADMIN_TOKEN
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RLM_")},
            **({"RLM_REDIS_URL": redis_url} if redis_url is not None else {}),
            "RLM_ADMIN_TOKEN": ADMIN_TOKEN,
            "RLM_LOG_LEVEL": "WARNING",
            **env,
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> BrokerProcess:
        rlm = Path(sys.executable).with_name("rlm")
        self._process = subprocess.Popen(
            [str(rlm), "broker", "--port", str(self.port)],
            env=self._env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"rlm broker exited with {self._process.returncode}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).status_code in (200, 503):
                    return self
            except httpx2.TransportError:
                time.sleep(0.05)
        self.kill()  # never leave a half-started broker behind a failed test
        raise RuntimeError("rlm broker did not become ready")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_until(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Poll an async or sync predicate until it is true (never a wall-time assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def loopback_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
) -> AsyncIterator[str]:
    """A TCP server on a free loopback port, `serve` run per connection; its `http://` URL.
    For the tests' scripted brokers and proxies."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        server.close()
