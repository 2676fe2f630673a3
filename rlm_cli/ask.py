"""`rlm ask`: one whole RLM run from the command line, with live progress on stderr."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import SecretStr

from host_poller.llm.errors import LLMConfigError
from host_poller.llm.profiles import HOW_TO_CONFIGURE, LLMSettings, check_cost_budget
from host_poller.llm.types import LLMClient
from host_poller.rlm.api import RLM, RunHooks
from host_poller.rlm.budget import Budget, RunBudgets
from host_poller.rlm.errors import RLMError
from host_poller.rlm.types import Contexts, RLMResult
from host_poller.settings import HostSettings
from rlm_cli import loop
from rlm_cli.checks import check_llm_keys, sandbox_worker_settings
from rlm_cli.env_file import RunningStack, running_stack
from rlm_cli.logs import logs_written_to
from rlm_cli.printer import Printer, printer_for
from rlm_cli.settings import cli_settings, load_settings
from rlm_repl import MAX_CONTEXTS

if TYPE_CHECKING:
    # rich is imported only on a terminal (`rlm_cli.printer`): its console when the command
    # runs, the live status line when it shows (tests/test_cli_startup.py).
    from rich.text import Text

    from rlm_cli.stack import LocalStack


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
        from rich.text import Text

        return Text(
            f"iteration {self.iteration}/{self.max_iterations} · sub-calls {self.sub_calls_done} "
            f"done, {self.in_flight} in flight · depth {self.depth_seen} · "
            f"{self.tokens:,} tokens · ${self.cost_usd:.4f} · {self.last}"
        )


def load_context(path: Path | None) -> Any:
    """A .json file is parsed (str, list of str, or dict); anything else is read as UTF-8 text.

    A file that is not UTF-8 (or not JSON, for .json) is a one-line `click.ClickException`.
    """
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(
            f"context file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}): convert it first, e.g. iconv -f LATIN1 -t UTF-8"
        ) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot read context file {path}: {exc.strerror}") from exc
    if path.suffix != ".json":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"context file {path} is not valid JSON: {exc}") from exc


@contextlib.asynccontextmanager
async def _runner(
    settings: HostSettings,
    llm_settings: LLMSettings,
    *,
    env_file: Path,
    scenario: str | None,
    console: Printer,
    budgets: RunBudgets,
) -> AsyncIterator[tuple[HostSettings, LLMClient | None]]:
    """Settings pointing at a broker with a poller: RLM_BROKER_URL's, else the stack of a
    running `rlm up` (its env file), else an embedded stack started for this run.

    `scenario` (the scripted LLM's) is an explicit choice: where it cannot be honoured (a
    provider is configured, or the stack is not this run's own) it is an error."""
    if settings.broker_url is not None:
        if scenario is not None:
            raise click.UsageError(
                "--scenario runs the scripted LLM on an embedded stack, but RLM_BROKER_URL is "
                "set: drop --scenario, or unset RLM_BROKER_URL"
            )
        if not llm_settings.is_configured:
            raise click.ClickException(
                f"RLM_BROKER_URL is set but no LLM is configured: {HOW_TO_CONFIGURE}"
            )
        console.print(f"using the broker at {settings.broker_url} (RLM_BROKER_URL)", style="dim")
        yield settings, None
        return
    running = await running_stack(env_file)
    if running is not None:
        if scenario is not None:
            raise click.UsageError(
                f"--scenario runs the scripted LLM on an embedded stack, but the stack of "
                f"`rlm up` at {running.broker_url} is running here and answers with its own "
                "LLM: drop --scenario, or stop that stack"
            )
        async with _on_running_stack(running, settings, llm_settings, console) as pair:
            yield pair
        return
    async with _on_embedded_stack(settings, scenario, console, budgets, llm_settings) as pair:
        yield pair


@contextlib.asynccontextmanager
async def _on_running_stack(
    stack: RunningStack, settings: HostSettings, llm_settings: LLMSettings, console: Printer
) -> AsyncIterator[tuple[HostSettings, LLMClient | None]]:
    """`settings` pointed at the stack of `rlm up`; its scripted LLM unless one is configured."""
    from host_poller.llm.client import build_client

    found = stack.variables
    updates: dict[str, Any] = {
        "broker_url": stack.broker_url,
        "tenant_token": SecretStr(found.get("RLM_TENANT_TOKEN", "")),
    }
    if settings.runtime_url is None and found.get("RLM_RUNTIME_URL"):
        updates["runtime_url"] = found["RLM_RUNTIME_URL"]
        updates["runtime_token"] = SecretStr(found.get("RLM_RUNTIME_TOKEN", ""))
    run_settings = settings.model_copy(update=updates)
    if run_settings.environment in ("pyodide", "remote") and run_settings.runtime_url is None:
        raise click.ClickException(
            f"the stack of `rlm up` at {stack.broker_url} runs no sandbox runtime, which the "
            f"{run_settings.environment} environment needs: pass --environment local for "
            "trusted code, or start `rlm up` with RLM_ENVIRONMENT=pyodide"
        )
    llm = llm_settings
    if not llm.is_configured:
        llm = load_settings(
            LLMSettings,
            llm_profiles=found.get("RLM_LLM_PROFILES"),
            root_profile=found.get("RLM_ROOT_PROFILE"),
            sub_profile=found.get("RLM_SUB_PROFILE"),
        )
        if not llm.is_configured:
            raise click.ClickException(
                f"the stack of `rlm up` at {stack.broker_url} names no LLM and none is "
                f"configured here: {HOW_TO_CONFIGURE}"
            )
    console.print(
        f"using the stack of `rlm up` at {stack.broker_url} ({stack.env_file})", style="dim"
    )
    client = build_client(llm.root())
    try:
        yield run_settings, client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _on_embedded_stack(
    settings: HostSettings,
    scenario: str | None,
    console: Printer,
    budgets: RunBudgets,
    llm_settings: LLMSettings,
) -> AsyncIterator[tuple[HostSettings, LLMClient | None]]:
    """A stack in this process for this one run: the configured LLM, or the scripted one
    when `--scenario` asks for it."""
    async with contextlib.AsyncExitStack() as running:
        with _collections_paused():
            stack = await running.enter_async_context(
                _embedded_stack(settings, scenario, console, budgets, llm_settings)
            )
        from rlm_cli.embedded import host_settings_for, root_client

        if stack.scripted_llm:
            console.print(
                f"using the scripted LLM (scenario {scenario!r}, --scenario), not a provider",
                style="yellow",
            )
        console.print(f"embedded stack: broker {stack.broker_url}", style="dim")
        client = root_client(stack)
        try:
            yield host_settings_for(stack, settings), client
        finally:
            await client.aclose()


@contextlib.contextmanager
def _collections_paused() -> Iterator[None]:
    """No collections while the embedded stack imports and starts its parts: ~150 of them,
    over objects that live until exit (17-95 ms of `rlm ask`'s start-up measured, load 1.6-4).
    What they made is then frozen, as `rlm` freezes what its imports make."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _embedded_stack(
    settings: HostSettings,
    scenario: str | None,
    console: Printer,
    budgets: RunBudgets,
    llm_settings: LLMSettings,
) -> LocalStack:
    """The stack `_on_embedded_stack` starts, checked: Deno and Pyodide when it runs
    sandboxes, an LLM unless `scenario` asks for the scripted one."""
    from rlm_cli.embedded import rlm_stack_components
    from rlm_cli.stack import LocalStack, SandboxRuntimeComponent, StackConfig

    components = rlm_stack_components(settings, budgets=budgets)
    if any(isinstance(c, SandboxRuntimeComponent) for c in components):
        sandbox_worker_settings()
    if scenario is None:
        if not llm_settings.is_configured:
            raise click.ClickException(
                f"no LLM is configured: {HOW_TO_CONFIGURE}; or pass --scenario count_words "
                "(depth2 with --max-depth 2) to run the scripted LLM"
            )
        console.print(llm_settings.describe(), style="dim")
        return LocalStack(StackConfig(llm_settings=llm_settings), components)
    return LocalStack(StackConfig(scenario=scenario, llm_settings=llm_settings), components)


async def _ask(
    settings: HostSettings,
    llm_settings: LLMSettings,
    context: Any,
    question: str,
    *,
    env_file: Path,
    scenario: str | None,
    budget: Budget,
    console: Printer,
    show_progress: bool,
) -> RLMResult:
    budgets = RunBudgets()
    progress = Progress(max_iterations=settings.max_iterations, budgets=budgets)
    runner = _runner(
        settings,
        llm_settings,
        env_file=env_file,
        scenario=scenario,
        console=console,
        budgets=budgets,
    )
    async with runner as (run_settings, client):
        from host_poller.environments import is_registered, registered_environments

        if not is_registered(run_settings.environment):
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
        from rich.console import Console
        from rich.file_proxy import FileProxy
        from rich.live import Live

        if not isinstance(console, Console):  # on a terminal `printer_for` gives rich's
            raise TypeError(f"a live status line needs rich's console, not {console!r}")

        live = Live(progress.render(), console=console, refresh_per_second=8, transient=True)
        # Log lines (warnings, on a terminal) print above the status line, not across it.
        with live, logs_written_to(FileProxy(console, console.file)):

            def update(event: str, fields: dict[str, Any]) -> None:
                progress.on_event(event, fields)
                live.update(progress.render())

            rlm.hooks = RunHooks(budgets=budgets, on_event=update)
            return await rlm.acompletion(context, question)


@click.command("ask")
@click.argument("question")
@click.option(
    "--context",
    "context_paths",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="File holding the context (.json: a str, list of str or dict; else text). Given "
    "several times, each file is a context of its own: context_0 (also `context`), "
    "context_1, ...",
)
@click.option("--environment", help="pyodide, remote, command or local (RLM_ENVIRONMENT).")
@click.option("--max-depth", type=int, help="Recursion depth (RLM_MAX_DEPTH).")
@click.option("--max-iterations", type=int, help="Root turns (RLM_MAX_ITERATIONS).")
@click.option("--max-sub-calls", type=int, help="Budget: sub-calls of the whole run.")
@click.option("--max-tokens", type=int, help="Budget: tokens of the whole run.")
@click.option("--max-cost", type=float, help="Budget: USD of the whole run.")
@click.option(
    "--max-seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="Budget: wall-clock seconds of the whole run (the run stops with what it has).",
)
@click.option(
    "--model",
    help="Root model at the provider of OPENAI_BASE_URL / OPENAI_API_KEY (RLM_MODEL).",
)
@click.option("--sub-model", help="Sub-call model at that provider (RLM_SUB_MODEL).")
@click.option(
    "--scenario",
    default=None,
    help="Run the scripted LLM with this scenario (count_words, depth2, ...) on an embedded "
    "stack; an error when a provider is configured.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--no-progress", is_flag=True, help="No live status line on stderr.")
def ask(
    question: str,
    context_paths: tuple[Path, ...],
    environment: str | None,
    max_depth: int | None,
    max_iterations: int | None,
    max_sub_calls: int | None,
    max_tokens: int | None,
    max_cost: float | None,
    max_seconds: float | None,
    model: str | None,
    sub_model: str | None,
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
    settings = load_settings(HostSettings).model_copy(update=updates)
    budget = Budget(
        max_sub_calls=max_sub_calls,
        max_tokens=max_tokens,
        max_cost_usd=max_cost,
        max_seconds=max_seconds,
    )
    # Bound to this stderr: during the run sys.stderr is rich's proxy, and the local
    # environment's capture wraps it again; a console following sys.stderr would loop.
    console = printer_for(sys.stderr)
    if len(context_paths) > MAX_CONTEXTS:
        raise click.UsageError(f"--context: at most {MAX_CONTEXTS} files")
    loaded = [load_context(path) for path in context_paths] or [load_context(None)]
    context: Any = Contexts(*loaded) if len(loaded) > 1 else loaded[0]
    llm_settings = load_settings(LLMSettings, model=model, sub_model=sub_model)
    if llm_settings.is_configured:
        if scenario is not None:
            raise click.UsageError(
                f"--scenario runs the scripted LLM, but an LLM is configured "
                f"({llm_settings.describe()}): drop --scenario, or unset what configures it"
            )
        check_llm_keys(llm_settings)
        if max_cost is not None:
            try:
                check_cost_budget([llm_settings.root(), llm_settings.sub()])
            except LLMConfigError as exc:
                raise click.UsageError(f"--max-cost: {exc.message}") from exc
    try:
        result = loop.run(
            _ask(
                settings,
                llm_settings,
                context,
                question,
                env_file=cli_settings().stack_env_file,
                scenario=scenario,
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
