"""`rlm view`: the trajectory viewer, on the host's trajectory directory, until a signal."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from host_poller.settings import HostSettings
from host_poller.viewer.settings import ViewerSettings
from rlm_cli import loop as event_loop
from rlm_cli.checks import check_ports_free, listen_error
from rlm_cli.settings import load_settings
from rlm_wire.serving import VIEWER_PORT, ListenError, LoopServer, uvicorn_config

_PORTS = {"view": "--port or RLM_VIEW_PORT"}


@click.command("view")
@click.option("--host", default=None, help="Interface [RLM_VIEW_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Port [RLM_VIEW_PORT, {VIEWER_PORT}]; 0 picks a free one.",
)
@click.option(
    "--trajectory-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of the trajectories [RLM_TRAJECTORY_DIR, the host's].",
)
def view(host: str | None, port: int | None, trajectory_dir: Path | None) -> None:
    """Browse RLM runs (iterations, sub-calls, sub-RLMs, timeline) from their trajectory
    files; read-only, loopback unless RLM_VIEW_TOKEN is set; until SIGINT/SIGTERM."""
    settings = load_settings(ViewerSettings, host=host, port=port)
    try:
        settings.check()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    directory = trajectory_dir or load_settings(HostSettings).trajectory_dir
    if directory.exists() and not directory.is_dir():
        raise click.ClickException(f"trajectory dir {directory} is not a directory")
    if not directory.exists():
        click.echo(
            f"rlm view: {directory} does not exist yet: no runs to show until one is written"
        )
    check_ports_free(settings.host, {"view": settings.port}, _PORTS)
    try:
        event_loop.run(_view(settings, directory))
    except ListenError as exc:
        raise listen_error(exc, _PORTS) from exc


async def _view(settings: ViewerSettings, directory: Path) -> None:
    from host_poller.viewer import create_app

    config = uvicorn_config(create_app(directory, settings), settings.host, settings.port)
    # Our own signal handlers, not uvicorn's: uvicorn raises the signal again after its
    # shutdown, and the command should end with 0 on SIGINT/SIGTERM.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    server = LoopServer(config, name="view")
    try:
        await server.start()
        address = server.url + "/"
        if settings.token is not None:
            # The token itself is never printed (output ends up in logs); the page trades it
            # for a cookie on the first visit.
            address += "?token=<RLM_VIEW_TOKEN>"
        click.echo(f"rlm view: trajectories of {directory}")
        click.echo(f"  view     {address}")
        click.echo("stop with Ctrl+C (SIGINT) or SIGTERM")
        await stop.wait()
    finally:
        await server.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


commands: list[click.Command] = [view]
