"""`rlm poller` and `rlm up`: the poller as a process, and the whole stack on one machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rlm_cli import loop
from rlm_cli.checks import check_llm_keys, check_ports_free, listen_error, sandbox_worker_settings
from rlm_cli.settings import cli_settings, load_settings
from rlm_wire.serving import BROKER_PORT, FAKE_LLM_PORT, SANDBOX_PORT, ListenError


@click.command("poller")
@click.option(
    "--broker-url",
    envvar="RLM_BROKER_URL",
    help="Broker base URL, or a comma-separated list of replicas to fail over between "
    "(RLM_BROKER_URL).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), help="Requests answered at once, all tenants."
)
@click.option(
    "--tenant-concurrency", type=click.IntRange(min=1), help="Requests of one tenant at once."
)
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), help="Long-poll wait (seconds).")
@click.option(
    "--grace", "grace_s", type=click.FloatRange(min=0), help="SIGTERM: seconds to finish calls."
)
@click.option(
    "--ledger",
    "ledger_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite usage ledger (RLM_LEDGER_PATH).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve Prometheus metrics on this port at /metrics (RLM_POLLER_METRICS_PORT).",
)
@click.option(
    "--sub-rlms/--no-sub-rlms",
    default=None,
    help="Answer rlm_query below max_depth with sub-RLMs (RLM_POLLER_SUB_RLMS; default on).",
)
def poller(
    broker_url: str | None,
    concurrency: int | None,
    tenant_concurrency: int | None,
    wait_s: float | None,
    grace_s: float | None,
    ledger_path: Path | None,
    metrics_port: int | None,
    sub_rlms: bool | None,
) -> None:
    """Answer the broker's queue with the configured LLMs until SIGTERM/SIGINT.

    The token comes from RLM_TENANT_TOKEN (this tenant's requests) or RLM_ADMIN_TOKEN (every
    tenant's); LLM profiles from RLM_LLM_PROFILES / RLM_LLM_PROFILES_FILE. Sub-RLMs run in
    RLM_ENVIRONMENT (a sandbox runtime at RLM_RUNTIME_URL for pyodide/remote).
    """
    from host_poller.llm.errors import LLMConfigError
    from host_poller.llm.profiles import LLMSettings
    from host_poller.poller.errors import BrokerRejected, PollerConfigError
    from host_poller.poller.serve import serve
    from host_poller.poller.settings import PollerSettings

    candidates: dict[str, Any] = {
        "broker_url": broker_url, "poller_concurrency": concurrency,
        "poller_tenant_concurrency": tenant_concurrency, "poller_wait_s": wait_s,
        "poller_grace_s": grace_s, "ledger_path": ledger_path,
        "poller_metrics_port": metrics_port, "poller_sub_rlms": sub_rlms,
    }  # fmt: skip
    settings = load_settings(PollerSettings, **candidates)
    llm_settings = load_settings(LLMSettings)
    try:
        settings.token()
        if not llm_settings.is_configured:
            raise click.UsageError(
                "no LLM is configured: set OPENAI_BASE_URL and/or OPENAI_API_KEY with RLM_MODEL, "
                "or RLM_LLM_PROFILES / RLM_LLM_PROFILES_FILE (or run `rlm up`, which serves "
                "the scripted LLM)"
            )
        llm_settings.sub()
    except (PollerConfigError, LLMConfigError) as exc:
        raise click.UsageError(str(exc)) from exc
    check_llm_keys(llm_settings)
    try:
        loop.run(serve(settings, llm_settings))
    except BrokerRejected as exc:
        raise click.ClickException(str(exc)) from exc


#: How to change the port of each server of `rlm up`, by the server's name.
_UP_PORTS = {
    "broker": "--port or RLM_BROKER_PORT",
    "sandbox": "--sandbox-port or RLM_SANDBOX_PORT",
    "fake-llm": "--llm-port or RLM_FAKE_LLM_PORT",
}


@click.command("up")
@click.option(
    "--port",
    "--broker-port",
    "broker_port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Broker port [RLM_BROKER_PORT, {BROKER_PORT}]; 0 picks a free one.",
)
@click.option(
    "--sandbox-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Sandbox runtime port [RLM_SANDBOX_PORT, {SANDBOX_PORT}]; 0 picks a free one.",
)
@click.option(
    "--llm-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help=f"Scripted LLM port [RLM_FAKE_LLM_PORT, {FAKE_LLM_PORT}]; 0 picks a free one.",
)
@click.option("--scenario", default=None,
              help="Scenario of the scripted LLM, served when no provider is configured "
              "[count_words].")  # fmt: skip
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the URLs and tokens are written (mode 0600), never printed "
    "[RLM_STACK_ENV_FILE, .rlm/local-stack.env].",
)
def up(
    broker_port: int | None,
    sandbox_port: int | None,
    llm_port: int | None,
    scenario: str | None,
    env_file: Path | None,
) -> None:
    """Start Redis, the broker, the scripted LLM (unless configured), the sandbox runtime (for
    the pyodide/remote environments) and a poller with sub-RLMs; keep them up until SIGINT/SIGTERM.

    URLs and tokens go to --env-file (mode 0600, removed at stop), never to the terminal;
    `rlm ask` started in the same directory finds the stack there by itself.
    """
    from broker.settings import BrokerSettings
    from fake_llm.server import FakeLLMSettings
    from host_poller.llm.profiles import LLMSettings
    from host_poller.settings import HostSettings
    from rlm_cli.embedded import rlm_stack_components
    from rlm_cli.stack import SandboxRuntimeComponent, StackConfig, run_until_signal
    from sandbox_runtime.service.settings import RuntimeSettings

    broker_settings = load_settings(BrokerSettings, broker_port=broker_port)
    llm_settings = load_settings(LLMSettings)
    if llm_settings.is_configured:
        if scenario is not None:
            raise click.UsageError(
                "--scenario drives the scripted LLM, but an LLM provider is configured "
                "(OPENAI_* / RLM_MODEL or RLM_LLM_PROFILES): drop one of them"
            )
        check_llm_keys(llm_settings)
    components = rlm_stack_components(load_settings(HostSettings))
    with_sandbox = any(isinstance(c, SandboxRuntimeComponent) for c in components)
    if with_sandbox:
        sandbox_worker_settings()
    config = StackConfig(
        broker_port=broker_settings.broker_port,
        sandbox_port=_port(sandbox_port, lambda: load_settings(RuntimeSettings).port),
        llm_port=_port(llm_port, lambda: load_settings(FakeLLMSettings).port),
        scenario=scenario or "count_words",
        env_file=env_file or cli_settings().stack_env_file,
        broker_settings=broker_settings,
        llm_settings=llm_settings,
    )
    ports = {"broker": config.broker_port}
    if with_sandbox:
        ports["sandbox"] = config.sandbox_port
    if not llm_settings.is_configured:
        ports["fake-llm"] = config.llm_port
    check_ports_free(config.host, ports, _UP_PORTS)
    try:
        loop.run(run_until_signal(config, announce=click.echo, components=components))
    except ListenError as exc:
        raise listen_error(exc, _UP_PORTS) from exc


def _port(given: int | None, configured: Callable[[], int]) -> int:
    return given if given is not None else configured()


commands: list[click.Command] = [poller, up]
