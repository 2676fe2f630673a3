"""`rlm ask`: one whole RLM run from the command line, with live progress on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from host_poller.llm.types import LLMClient
from host_poller.rlm.api import RLM, RunHooks
from host_poller.rlm.budget import Budget, RunBudgets
from host_poller.rlm.errors import RLMError
from host_poller.rlm.types import RLMResult
from host_poller.settings import HostSettings


@dataclass
class Progress:
    """What the status line shows; updated from the run's events."""

    max_iterations: int
    iteration: int = 0
    sub_calls_done: int = 0
    depth_seen: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    in_flight: int = 0
    last: str = "starting"
    budgets: RunBudgets | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        depth = int(fields.get("depth", 0))
        self.depth_seen = max(self.depth_seen, depth)
        if event == "run_start":
            self.run_id = fields.get("run_id")
        if event == "iteration_start" and depth == 0:
            self.iteration = int(fields.get("index", 0)) + 1
        if event == "sub_call":
            self.sub_calls_done += 1
        usage = fields.get("run_usage") if event == "iteration" else None
        if isinstance(usage, dict):
            self.tokens = int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
            self.cost_usd = float(usage.get("cost_usd", 0.0))
        if self.budgets is not None and self.run_id is not None:
            tracker = self.budgets(self.run_id)
            if tracker is not None:
                usage_now = tracker.usage
                self.tokens, self.cost_usd = usage_now.total_tokens, usage_now.cost_usd
                self.in_flight = tracker.sub_calls_in_flight
        self.last = event

    def render(self) -> Text:
        return Text(
            f"iteration {self.iteration}/{self.max_iterations} · sub-calls {self.sub_calls_done} "
            f"done, {self.in_flight} in flight · depth {self.depth_seen} · "
            f"{self.tokens:,} tokens · ${self.cost_usd:.4f} · {self.last}"
        )


def load_context(path: Path | None) -> Any:
    """A .json file is parsed (str, list of str, or dict); anything else is read as text."""
    if path is None:
        return ""
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else text


@contextlib.asynccontextmanager
async def _runner(
    settings: HostSettings, scenario: str, console: Console, budgets: RunBudgets
) -> AsyncIterator[tuple[HostSettings, LLMClient | None]]:
    """Settings pointing at a broker with a poller: the configured one, else an embedded stack."""
    from host_poller.llm.profiles import LLMSettings

    if settings.broker_url is not None:
        if not LLMSettings().is_configured:
            raise click.UsageError(
                "RLM_BROKER_URL is set but no LLM profile is configured (RLM_LLM_PROFILES); "
                "unset RLM_BROKER_URL to run on an embedded stack with the scripted LLM"
            )
        yield settings, None
        return
    from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
    from rlm_cli.stack import LocalStack, StackConfig

    components = rlm_stack_components(settings, budgets=budgets)
    async with LocalStack(StackConfig(scenario=scenario), components) as stack:
        if stack.scripted_llm:
            console.print(
                f"[yellow]no LLM provider configured: using the scripted LLM "
                f"(scenario {scenario!r})[/yellow]"
            )
        console.print(f"embedded stack: broker {stack.broker_url}", style="dim")
        client = root_client(stack)
        try:
            yield host_settings_for(stack, settings), client
        finally:
            await client.aclose()


async def _ask(
    settings: HostSettings,
    context: Any,
    question: str,
    *,
    scenario: str,
    budget: Budget,
    console: Console,
    show_progress: bool,
) -> RLMResult:
    budgets = RunBudgets()
    progress = Progress(max_iterations=settings.max_iterations, budgets=budgets)
    async with _runner(settings, scenario, console, budgets) as (run_settings, client):
        from host_poller.environments import registered_environments

        if run_settings.environment not in registered_environments():
            raise click.UsageError(
                f"environment {run_settings.environment!r} is not available here "
                f"(registered: {', '.join(registered_environments())}); try --environment local"
            )
        rlm = RLM(
            model=client,
            budget=budget,
            settings=run_settings,
            hooks=RunHooks(budgets=budgets, on_event=progress.on_event),
        )
        if not show_progress:
            return await rlm.acompletion(context, question)
        with Live(progress.render(), console=console, refresh_per_second=8, transient=True) as live:

            def update(event: str, fields: dict[str, Any]) -> None:
                progress.on_event(event, fields)
                live.update(progress.render())

            rlm.hooks = RunHooks(budgets=budgets, on_event=update)
            return await rlm.acompletion(context, question)


@click.command("ask")
@click.argument("question")
@click.option(
    "--context",
    "context_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the context (.json: a str, list of str or dict; else text).",
)
@click.option("--environment", help="pyodide, remote or local (RLM_ENVIRONMENT).")
@click.option("--max-depth", type=int, help="Recursion depth (RLM_MAX_DEPTH).")
@click.option("--max-iterations", type=int, help="Root turns (RLM_MAX_ITERATIONS).")
@click.option("--max-sub-calls", type=int, help="Budget: sub-calls of the whole run.")
@click.option("--max-tokens", type=int, help="Budget: tokens of the whole run.")
@click.option("--max-cost", type=float, help="Budget: USD of the whole run.")
@click.option(
    "--scenario",
    default=None,
    help="Scripted-LLM scenario when no provider is configured "
    "(default: count_words, or depth2 with --max-depth 2).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--no-progress", is_flag=True, help="No live status line on stderr.")
def ask(
    question: str,
    context_path: Path | None,
    environment: str | None,
    max_depth: int | None,
    max_iterations: int | None,
    max_sub_calls: int | None,
    max_tokens: int | None,
    max_cost: float | None,
    scenario: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Answer QUESTION over the context with one RLM run; the answer goes to stdout."""
    updates: dict[str, Any] = {}
    if environment:
        updates["environment"] = environment
    if max_depth is not None:
        updates["max_depth"] = max_depth
    if max_iterations is not None:
        updates["max_iterations"] = max_iterations
    settings = HostSettings().model_copy(update=updates)
    budget = Budget(max_sub_calls=max_sub_calls, max_tokens=max_tokens, max_cost_usd=max_cost)
    chosen = scenario or ("depth2" if settings.max_depth >= 2 else "count_words")
    console = Console(stderr=True)
    try:
        result = asyncio.run(
            _ask(
                settings,
                load_context(context_path),
                question,
                scenario=chosen,
                budget=budget,
                console=console,
                show_progress=not no_progress and console.is_terminal,
            )
        )
    except RLMError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.answer if result.answer is not None else "")
    usage = result.usage
    console.print(
        f"{result.stop_reason}: {result.stop_detail} · {len(result.iterations)} iterations · "
        f"{usage.calls} LLM calls · {usage.total_tokens:,} tokens · ${usage.cost_usd:.4f} · "
        f"{result.wall_s:.2f} s · trajectory {result.trajectory_path}",
        style="dim",
    )
    if result.answer is None:
        sys.exit(2)


commands: list[click.Command] = [ask]
