"""`rlm broker`: serve the broker."""

from __future__ import annotations

import click
from pydantic import ValidationError

from broker.settings import BrokerSettings
from rlm_wire.errors import WireError


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


@click.group("tenant")
def tenant_group() -> None:
    """Manage tenants (needs RLM_ADMIN_TOKEN)."""


@tenant_group.command("create")
@click.argument("name")
@click.option(
    "--broker-url", envvar="RLM_BROKER_URL", default="http://127.0.0.1:8000", show_default=True
)
def tenant_create(name: str, broker_url: str) -> None:
    """Create a tenant; prints {"tenant_id", "token"} as JSON (the token is shown only once)."""
    import asyncio
    import os

    from rlm_wire.broker_client import BrokerClient

    admin_token = os.environ.get("RLM_ADMIN_TOKEN")
    if not admin_token:
        raise click.UsageError("set RLM_ADMIN_TOKEN")

    async def create() -> str:
        async with BrokerClient(broker_url, admin_token) as admin:
            return (await admin.create_tenant(name)).model_dump_json()

    try:
        click.echo(asyncio.run(create()))
    except WireError as exc:
        raise click.ClickException(str(exc)) from exc


commands: list[click.Command] = [broker_command, tenant_group]
