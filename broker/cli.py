"""`rlm broker`: serve the broker."""

from __future__ import annotations

import click
from pydantic import ValidationError

from broker.settings import BrokerSettings


@click.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to bind.")
def broker_command(host: str, port: int) -> None:
    """Serve the broker (configuration: RLM_* variables, see docs/configuration.md).

    Without RLM_REDIS_URL it starts an embedded Redis on a free loopback port and stops it
    on exit.
    """
    from broker.serve import serve

    try:
        settings = BrokerSettings()
    except ValidationError as exc:
        raise click.UsageError(f"invalid configuration:\n{exc}") from exc
    serve(settings, host, port)


commands: list[click.Command] = [broker_command]
