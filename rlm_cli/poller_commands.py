"""`rlm poller` and `rlm up`: the poller as a process, and the whole stack on one machine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click


@click.command("poller")
@click.option("--broker-url", envvar="RLM_BROKER_URL", help="Broker base URL (RLM_BROKER_URL).")
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
    settings = PollerSettings(**{k: v for k, v in candidates.items() if v is not None})
    try:
        settings.token()
        llm_settings = LLMSettings()
        if not llm_settings.is_configured:
            raise click.UsageError(
                "no LLM profile is configured: set RLM_LLM_PROFILES or RLM_LLM_PROFILES_FILE "
                "(or run `rlm up`, which serves the scripted LLM)"
            )
        llm_settings.sub()
    except (PollerConfigError, LLMConfigError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        asyncio.run(serve(settings, llm_settings))
    except BrokerRejected as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("up")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True,
              help="Broker port; 0 picks a free one.")  # fmt: skip
@click.option("--scenario", default="count_words", show_default=True,
              help="Scenario of the scripted LLM (when no provider is configured).")  # fmt: skip
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".rlm/local-stack.env"),
    show_default=True,
    help="Where the URLs and tokens are written (mode 0600); never printed.",
)
def up(port: int, scenario: str, env_file: Path) -> None:
    """Start Redis, the broker, the scripted LLM (unless configured), the sandbox runtime (for
    the pyodide/remote environments) and a poller with sub-RLMs; keep them up until SIGINT/SIGTERM.

    URLs and tokens go to --env-file (mode 0600, removed at stop), never to the terminal.
    """
    from rlm_cli.embedded import rlm_stack_components
    from rlm_cli.stack import StackConfig, run_until_signal

    config = StackConfig(broker_port=port, scenario=scenario, env_file=env_file)
    components = rlm_stack_components()
    asyncio.run(run_until_signal(config, announce=click.echo, components=components))


commands: list[click.Command] = [poller, up]
