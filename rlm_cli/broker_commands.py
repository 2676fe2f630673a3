"""`rlm broker`: serve the broker."""

from __future__ import annotations

import click

from broker.settings import BrokerSettings
from rlm_cli.checks import listen_error
from rlm_cli.settings import load_settings
from rlm_wire.errors import WireError
from rlm_wire.serving import BROKER_PORT, ListenError


@click.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Port to bind [RLM_BROKER_PORT, {BROKER_PORT}]; 0 picks a free one.",
)
def broker_command(host: str, port: int | None) -> None:
    """Serve the broker (configuration: RLM_* variables, see docs/configuration.md).

    Without RLM_REDIS_URL it starts an embedded Redis on a free loopback port and stops it
    on exit.
    """
    from broker.serve import serve

    settings = load_settings(BrokerSettings, broker_port=port)
    try:
        serve(settings, host, settings.broker_port)
    except ListenError as exc:
        raise listen_error(exc, {"broker": "--port or RLM_BROKER_PORT"}) from exc


@click.group("tenant")
def tenant_group() -> None:
    """Manage tenants (needs RLM_ADMIN_TOKEN)."""


@tenant_group.command("create")
@click.argument("name")
@click.option(
    "--broker-url",
    envvar="RLM_BROKER_URL",
    default=f"http://127.0.0.1:{BROKER_PORT}",
    show_default=True,
    help="Broker base URL (RLM_BROKER_URL).",
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
