"""Serving the runtime with uvicorn: in the foreground (`rlm sandbox`) or on a thread.

The event loop is `RuntimeSettings.loop` (uvloop by default).
"""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette

from rlm_wire.serving import ThreadedServer
from rlm_wire.serving import uvicorn_config as http_config
from sandbox_runtime.service.app import create_app
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings


def uvicorn_config(app: Starlette, settings: RuntimeSettings) -> uvicorn.Config:
    """uvicorn's config for the runtime: its host, port, grace and event loop."""
    return http_config(
        app,
        settings.host,
        settings.port,
        loop=settings.loop,
        graceful_shutdown_s=int(settings.shutdown_grace_s) + 5,
    )


def serve(settings: RuntimeSettings, worker_settings: WorkerSettings) -> None:
    """Run the runtime until SIGINT/SIGTERM."""
    uvicorn.Server(uvicorn_config(create_app(settings, worker_settings), settings)).run()


class BackgroundRuntime(ThreadedServer):
    """The runtime on a thread of this process (local stack, benchmarks, tests).

    `port=0` in the settings picks a free port; `url` tells which after `start()`. `stop()`
    gives executions the grace period, then every sandbox is killed.
    """

    def __init__(
        self, settings: RuntimeSettings, worker_settings: WorkerSettings | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, worker_settings)
        super().__init__(
            uvicorn_config(self.app, settings),
            name="rlm-sandbox",
            start_timeout_s=30.0,
            stop_timeout_s=30.0,
        )
