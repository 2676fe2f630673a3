"""`rlm` subcommands of the host side. Each is a click command added to `commands`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from host_poller.llm.ledger import DIMENSIONS
from rlm_cli import loop
from rlm_cli.ask import ask
from rlm_cli.checks import listen_error
from rlm_cli.demo_cli import demo
from rlm_cli.poller_commands import poller, up
from rlm_cli.settings import load_settings
from rlm_wire.serving import FAKE_LLM_PORT, ListenError


@click.command("fake-llm")
@click.option(
    "--scenario",
    default="count_words",
    show_default=True,
    help="Scenario JSON file, or the name of a shipped scenario.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Port [RLM_FAKE_LLM_PORT, {FAKE_LLM_PORT}]; 0 picks a free one.",
)
@click.option("--list", "list_only", is_flag=True, help="List the shipped scenarios and exit.")
def fake_llm(scenario: str, host: str, port: int | None, list_only: bool) -> None:
    """Serve the scripted OpenAI-compatible LLM; prints its base URL once bound."""
    from fake_llm import load_scenario, serve_forever, shipped_scenarios
    from fake_llm.server import FakeLLMSettings

    if list_only:
        for name in shipped_scenarios():
            click.echo(name)
        return
    try:
        loaded = load_scenario(scenario)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--scenario") from exc

    def ready(base_url: str) -> None:
        click.echo(f"fake LLM ({loaded.name}) listening on {base_url}")

    settings = load_settings(FakeLLMSettings, port=port)
    try:
        loop.run(serve_forever(loaded, host=host, port=settings.port, on_ready=ready))
    except ListenError as exc:
        raise listen_error(exc, {"fake-llm": "--port or RLM_FAKE_LLM_PORT"}) from exc


@click.command("usage")
@click.option(
    "--ledger",
    "ledger_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RLM_LEDGER_PATH",
    required=True,
    help="The SQLite usage ledger file (RLM_LEDGER_PATH).",
)
@click.option(
    "--by",
    "group_by",
    multiple=True,
    type=click.Choice(DIMENSIONS),
    help="Group by this column; repeat for several.",
)
@click.option("--tenant", "tenant_id", help="Only this tenant.")
@click.option("--session", "session_id", help="Only this session.")
@click.option("--run", "run_id", help="Only this run.")
@click.option("--model", help="Only this model.")
@click.option("--depth", type=int, help="Only this depth.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def usage(
    ledger_path: Path,
    group_by: tuple[str, ...],
    tenant_id: str | None,
    session_id: str | None,
    run_id: str | None,
    model: str | None,
    depth: int | None,
    as_json: bool,
) -> None:
    """Tokens, calls and cost from the usage ledger, optionally grouped."""
    from host_poller.llm.ledger import UsageLedger
    from host_poller.llm.usage_table import render_usage_table

    if not ledger_path.exists():
        raise click.BadParameter(f"no ledger at {ledger_path}", param_hint="--ledger")
    candidates = {
        "tenant_id": tenant_id, "session_id": session_id, "run_id": run_id,
        "model": model, "depth": depth,
    }  # fmt: skip
    filters = {k: v for k, v in candidates.items() if v is not None}
    with UsageLedger(ledger_path) as ledger:
        rows = ledger.totals(group_by=group_by, **filters)
    if as_json:
        payload = [{**keys, **totals.to_wire()} for keys, totals in rows]
        click.echo(json.dumps(payload, indent=2))
        return
    render_usage_table(rows, list(group_by))


commands: list[click.Command] = [fake_llm, usage, poller, up, ask, demo]
