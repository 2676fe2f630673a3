"""`rlm serve`: RLMs as an OpenAI-compatible HTTP service, on the local stack or a broker.

Without RLM_BROKER_URL it starts the stack `rlm up` starts (Redis, broker, sandbox runtime
for the pyodide/remote environments, a poller with sub-RLMs), each part on a free port, and
the service on RLM_SERVE_PORT (8200); the runs and the poller share one run-budget registry,
so a request's budget covers every depth. With RLM_BROKER_URL it serves runs on that broker
(RLM_TENANT_TOKEN's tenant; a poller must answer it).
"""

from __future__ import annotations

import click
from pydantic import SecretStr

from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import HOW_TO_CONFIGURE, LLMSettings
from host_poller.poller.settings import PollerSettings
from host_poller.rlm.budget import RunBudgets
from host_poller.service.settings import ServeSettings
from host_poller.settings import HostSettings
from rlm_cli import loop
from rlm_cli.checks import check_llm_keys, check_ports_free, listen_error, sandbox_worker_settings
from rlm_cli.settings import load_settings
from rlm_cli.stack import LocalStack, ServiceComponent
from rlm_wire.serving import SERVE_PORT, ListenError, LoopServer, uvicorn_config

#: In-flight requests get this long to finish when the service stops.
GRACEFUL_SHUTDOWN_S = 10
_PORTS = {"serve": "--port or RLM_SERVE_PORT"}


class ServeComponent(ServiceComponent):
    """`rlm serve` on the stack's broker and LLM; start it after the poller."""

    name = "serve"

    def __init__(
        self,
        settings: ServeSettings,
        host: HostSettings | None = None,
        *,
        budgets: RunBudgets,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.host = host
        self.budgets = budgets
        self._ledger: UsageLedger | None = None

    async def start(self, stack: LocalStack) -> None:
        from host_poller.service import RLMService, create_app
        from rlm_cli.embedded import host_settings_for

        if stack.llm_settings is None:
            raise RuntimeError("the serve component needs the llm component before it")
        self._ledger = _open_ledger(stack.config.poller_settings)
        settings = self.settings
        if settings.redis_url is None:  # the runs of /v1/runs are kept in the stack's Redis
            settings = settings.model_copy(update={"redis_url": SecretStr(stack.redis_url)})
        service = RLMService(
            settings,
            host_settings_for(stack, self.host),
            stack.llm_settings,
            budgets=self.budgets,
            ledger=self._ledger,
        )
        config = uvicorn_config(
            create_app(service),
            self.settings.host,
            self.settings.port,
            graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
        )
        await self._serve(stack, config)

    async def stop(self) -> None:
        await super().stop()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None


def _open_ledger(poller_settings: PollerSettings | None) -> UsageLedger | None:
    """The usage ledger of RLM_LEDGER_PATH, where the runs' root calls are recorded (the
    poller records their sub-calls in the same file); None when unset."""
    settings = poller_settings or PollerSettings()
    if settings.ledger_path is None:
        return None
    return UsageLedger(settings.ledger_path, detail_days=settings.ledger_detail_days)


@click.command("serve")
@click.option("--host", default=None, help="Interface [RLM_SERVE_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Port [RLM_SERVE_PORT, {SERVE_PORT}]; 0 picks a free one.",
)
@click.option("--model", help="Root model at the provider of OPENAI_BASE_URL (RLM_MODEL).")
@click.option("--sub-model", help="Sub-call model at that provider (RLM_SUB_MODEL).")
@click.option(
    "--scenario",
    default=None,
    help="Serve the scripted LLM with this scenario (demos, tests); an error when a provider "
    "is configured.",
)
def serve(
    host: str | None,
    port: int | None,
    model: str | None,
    sub_model: str | None,
    scenario: str | None,
) -> None:
    """Serve RLMs over HTTP, OpenAI-compatible: POST /v1/chat/completions with model "rlm"
    (or "rlm/<profile>"), GET /v1/models, GET /health; until SIGINT/SIGTERM."""
    settings = load_settings(ServeSettings, host=host, port=port)
    host_settings = load_settings(HostSettings)
    try:
        settings.check(host_settings.environment)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    llm = load_settings(LLMSettings, model=model, sub_model=sub_model)
    if llm.is_configured:
        if scenario is not None:
            raise click.UsageError(
                f"--scenario serves the scripted LLM, but an LLM is configured "
                f"({llm.describe()}): drop --scenario, or unset what configures it"
            )
        check_llm_keys(llm)
    elif scenario is None:
        raise click.UsageError(
            f"no LLM is configured: {HOW_TO_CONFIGURE}; or pass --scenario NAME to serve the "
            "scripted LLM"
        )
    check_ports_free(settings.host, {"serve": settings.port}, _PORTS)
    try:
        if host_settings.broker_url is not None:
            if scenario is not None:
                raise click.UsageError(
                    "--scenario serves the scripted LLM on a local stack, but RLM_BROKER_URL "
                    "is set: drop --scenario, or unset RLM_BROKER_URL"
                )
            loop.run(_serve_on_broker(settings, host_settings, llm))
        else:
            loop.run(_serve_on_stack(settings, host_settings, llm, scenario))
    except ListenError as exc:
        raise listen_error(exc, _PORTS) from exc


async def _serve_on_broker(settings: ServeSettings, host: HostSettings, llm: LLMSettings) -> None:
    from host_poller.service import RLMService, create_app

    # Static keys (and an open service) run as the service's own tenant; with tenant tokens
    # only, every run is opened with its caller's token.
    if host.tenant_token is None and (settings.static_keys() or not settings.tenant_tokens):
        raise click.UsageError(
            "RLM_BROKER_URL is set: set RLM_TENANT_TOKEN too (or serve tenant tokens only: "
            "RLM_SERVE_TENANT_TOKENS=true without RLM_SERVE_API_KEYS)"
        )
    ledger = _open_ledger(None)
    try:
        config = uvicorn_config(
            create_app(RLMService(settings, host, llm, ledger=ledger)),
            settings.host,
            settings.port,
            graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
        )
        server = await LoopServer(config, name="serve", handle_signals=True).start()
        click.echo(f"rlm serve is up on the broker at {host.broker_url}")
        click.echo(f"  serve    {server.url}")
        click.echo(llm.describe())
        await server.wait()
    finally:
        if ledger is not None:
            ledger.close()


async def _serve_on_stack(
    settings: ServeSettings, host: HostSettings, llm: LLMSettings, scenario: str | None
) -> None:
    from rlm_cli.embedded import rlm_stack_components
    from rlm_cli.stack import SandboxRuntimeComponent, StackConfig, run_until_signal

    budgets = RunBudgets()
    components = rlm_stack_components(host, budgets=budgets)
    if any(isinstance(c, SandboxRuntimeComponent) for c in components):
        sandbox_worker_settings()
    components.append(ServeComponent(settings, host, budgets=budgets))
    config = StackConfig(scenario=scenario or "count_words", llm_settings=llm)
    if llm.is_configured:
        click.echo(llm.describe())
    await run_until_signal(config, announce=click.echo, components=components)


commands: list[click.Command] = [serve]
