"""Commands that belong to no single component."""

from __future__ import annotations

import click

from rlm_cli.config_docs import SETTINGS_CLASSES, load, render_markdown, rows


@click.command("config")
@click.option("--markdown", is_flag=True, help="Print docs/configuration.md.")
def config_command(markdown: bool) -> None:
    """List every RLM_* setting of every component, with its default and meaning."""
    if markdown:
        click.echo(render_markdown(), nl=False)
        return
    for title, path in SETTINGS_CLASSES:
        click.echo(click.style(title, bold=True))
        for variable, default, meaning in rows(load(path)):
            click.echo(f"  {variable.strip('`'):<36} {default.strip('`'):<18} {meaning}")


commands: list[click.Command] = [config_command]
