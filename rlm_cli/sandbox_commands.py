"""`rlm sandbox`: run the sandbox runtime service (Pyodide sandboxes behind an HTTP API)."""

from __future__ import annotations

import click


@click.command("sandbox")
@click.option("--host", default=None, help="Interface to listen on [RLM_SANDBOX_HOST, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [RLM_SANDBOX_PORT, 8100].")
@click.option("--pool-size", type=int, default=None, help="Warm sandboxes [RLM_SANDBOX_POOL_SIZE].")
def sandbox(host: str | None, port: int | None, pool_size: int | None) -> None:
    """Run the sandbox runtime: sessions and stateless executions in Pyodide sandboxes."""
    from pydantic import ValidationError

    from sandbox_runtime.service.serve import serve
    from sandbox_runtime.service.settings import RuntimeSettings
    from sandbox_runtime.worker import WorkerSettings

    overrides = {
        key: value
        for key, value in {"host": host, "port": port, "pool_size": pool_size}.items()
        if value is not None
    }
    try:
        settings = RuntimeSettings(**overrides)  # type: ignore[arg-type]
        worker_settings = WorkerSettings()
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc
    serve(settings, worker_settings)


commands: list[click.Command] = [sandbox]
