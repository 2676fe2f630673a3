"""Serving the runtime with uvicorn: in the foreground (`rlm sandbox`) or on a thread.

The runtime runs on the stdlib asyncio loop, not uvloop: it supervises child processes
through pipes, and under uvloop the read pipe of a killed sandbox stays open (a half-closed
transport) until the loop ends. Its HTTP traffic is light next to the broker's.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from starlette.applications import Starlette

from sandbox_runtime.service.app import create_app
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings


def uvicorn_config(
    app: Starlette, settings: RuntimeSettings, port: int | None = None
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        loop="asyncio",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


def serve(settings: RuntimeSettings, worker_settings: WorkerSettings) -> None:
    """Run the runtime until SIGINT/SIGTERM."""
    uvicorn.Server(uvicorn_config(create_app(settings, worker_settings), settings)).run()


class BackgroundRuntime:
    """The runtime on a thread of this process (local stack, benchmarks, tests).

    `port=0` in the settings picks a free port; `url` tells which after `start()`.
    """

    def __init__(
        self, settings: RuntimeSettings, worker_settings: WorkerSettings | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, worker_settings)
        self._server = uvicorn.Server(uvicorn_config(self.app, settings))
        self._thread = threading.Thread(target=self._server.run, name="rlm-sandbox", daemon=True)

    @property
    def url(self) -> str:
        servers = self._server.servers
        if not servers or not servers[0].sockets:
            raise RuntimeError("the runtime is not started")
        host, port = servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start serving; returns once the socket is bound and the lifespan has run."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox runtime did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving: executions get the grace period, then every sandbox is killed."""
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
