"""`rlm demo` command."""

from __future__ import annotations

import asyncio
import os

import click


@click.command("demo")
@click.option("--tenants", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--words", default=20_000, show_default=True, type=click.IntRange(100, 10**7))
def demo(tenants: int, words: int) -> None:
    """Run one RLM per tenant, all at once, against a running stack; check every answer.

    Needs RLM_BROKER_URL, RLM_ADMIN_TOKEN (to create the tenants), an LLM profile for the
    root model (RLM_LLM_PROFILES) and, for the pyodide environment, RLM_RUNTIME_URL and
    RLM_RUNTIME_TOKEN. A poller holding the admin token must be answering the broker.
    """
    from host_poller.settings import HostSettings
    from rlm_cli.demo import QUESTION, run_demo

    admin_token = os.environ.get("RLM_ADMIN_TOKEN")
    if not admin_token:
        raise click.UsageError("RLM_ADMIN_TOKEN is needed to create the demo tenants")
    outcomes = asyncio.run(run_demo(HostSettings(), admin_token, tenants=tenants, words=words))
    click.echo(f"question: {QUESTION}")
    for outcome in outcomes:
        usage = outcome.result.usage
        verdict = "ok" if outcome.correct else "WRONG"
        click.echo(
            f"{outcome.tenant}: answer {outcome.result.answer!r}, expected {outcome.expected} "
            f"[{verdict}] ({len(outcome.result.iterations)} iterations, {usage.calls} LLM calls, "
            f"{usage.total_tokens} tokens, {outcome.result.wall_s:.2f} s)"
        )
    if not all(o.correct for o in outcomes):
        raise SystemExit(1)


commands: list[click.Command] = [demo]
