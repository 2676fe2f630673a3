"""`rlm sandbox`: run the sandbox runtime service (Pyodide sandboxes behind an HTTP API)."""

from __future__ import annotations

import click

from rlm_cli.checks import listen_error, sandbox_worker_settings
from rlm_cli.settings import load_settings
from rlm_wire.serving import SANDBOX_PORT, ListenError


@click.command("sandbox")
@click.option("--host", default=None, help="Interface to listen on [RLM_SANDBOX_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Port [RLM_SANDBOX_PORT, {SANDBOX_PORT}]; 0 picks a free one.",
)
@click.option("--pool-size", type=int, default=None, help="Warm sandboxes [RLM_SANDBOX_POOL_SIZE].")
def sandbox(host: str | None, port: int | None, pool_size: int | None) -> None:
    """Run the sandbox runtime: sessions and stateless executions in Pyodide sandboxes.

    Deno and Pyodide are checked first: without them it stops at once, naming scripts/setup.sh.
    """
    from sandbox_runtime.service.serve import serve
    from sandbox_runtime.service.settings import RuntimeSettings

    settings = load_settings(RuntimeSettings, host=host, port=port, pool_size=pool_size)
    try:
        settings.bearer_token()  # the runtime never starts open
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    worker_settings = sandbox_worker_settings()
    try:
        serve(settings, worker_settings)
    except ListenError as exc:
        raise listen_error(exc, {"sandbox": "--port or RLM_SANDBOX_PORT"}) from exc


commands: list[click.Command] = [sandbox]
