"""Serving the runtime with uvicorn: in the foreground (`rlm sandbox`) or on a thread.

The event loop is `RuntimeSettings.loop` (uvloop by default). `check_prerequisites` tells at
start, in well under a second, whether Deno and Pyodide are there to run sandboxes at all.
"""

from __future__ import annotations

import subprocess

import uvicorn
from starlette.applications import Starlette

from rlm_wire.serving import ThreadedServer, listen_socket
from rlm_wire.serving import uvicorn_config as http_config
from sandbox_runtime.errors import SandboxStartError
from sandbox_runtime.service.app import create_app
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings
from sandbox_runtime.worker.launcher import check_confinement

#: `deno --version` answers in milliseconds; a binary that hangs is as broken as a missing one.
DENO_CHECK_TIMEOUT_S = 2.0
#: What every missing-install error tells the user to do.
SETUP = "run scripts/setup.sh"


def check_prerequisites(worker_settings: WorkerSettings) -> None:
    """Raise `SandboxStartError` (one line, naming the fix) unless `deno --version` runs,
    the Pyodide directory holds `pyodide.asm.wasm` and sandboxes can be confined as required
    (or RLM_SANDBOX_ALLOW_WEAKER says to run with less)."""
    deno = worker_settings.deno_path
    where = f"Deno at {deno} (RLM_SANDBOX_DENO_PATH)"
    try:
        done = subprocess.run(
            [str(deno), "--version"],
            capture_output=True,
            timeout=DENO_CHECK_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise SandboxStartError(f"{where} is missing: {SETUP}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SandboxStartError(
            f"{where} did not answer `deno --version` within {DENO_CHECK_TIMEOUT_S:g} s: {SETUP}"
        ) from exc
    except OSError as exc:
        raise SandboxStartError(f"{where} cannot run ({exc.strerror or exc}): {SETUP}") from exc
    if done.returncode != 0:
        raise SandboxStartError(
            f"{where} is broken (`deno --version` exited with {done.returncode}): {SETUP}"
        )
    if not done.stdout.startswith(b"deno "):
        raise SandboxStartError(f"{where} is not Deno (`deno --version` said otherwise): {SETUP}")
    wasm = worker_settings.pyodide_dir / "pyodide.asm.wasm"
    if not wasm.is_file():
        raise SandboxStartError(f"Pyodide is missing: no {wasm} (RLM_SANDBOX_PYODIDE_DIR): {SETUP}")
    # Sandboxes confined as required (bwrap), or the operator's explicit consent to less.
    check_confinement(worker_settings)


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
    """Run the runtime until SIGINT/SIGTERM (callers run `check_prerequisites` first).

    A port in use raises `rlm_wire.serving.PortInUseError` before anything starts.
    """
    sock = listen_socket(settings.host, settings.port, name="sandbox")
    config = uvicorn_config(create_app(settings, worker_settings), settings)
    uvicorn.Server(config).run(sockets=[sock])


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
