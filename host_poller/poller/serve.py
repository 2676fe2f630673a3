"""Running a poller as a process: build it from settings, stop it on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from host_poller.llm.client import build_client
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import LLMSettings, Profile
from host_poller.llm.types import LLMClient
from host_poller.poller.handler import RequestHandler
from host_poller.poller.hooks import BudgetLookup, SubRLMRunner
from host_poller.poller.metrics import PollerMetrics
from host_poller.poller.poller import Poller
from host_poller.poller.router import ModelRouter
from host_poller.poller.settings import PollerSettings

if TYPE_CHECKING:
    from host_poller.rlm.budget import RunBudgets

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_poller(
    settings: PollerSettings,
    llm_settings: LLMSettings,
    *,
    budgets: BudgetLookup | None = None,
    sub_rlm: SubRLMRunner | None = None,
    ledger: UsageLedger | None = None,
    router: ModelRouter | None = None,
) -> AsyncIterator[Poller]:
    """A poller with its LLM clients and ledger; what this opened is closed on exit.

    `ledger` and `router` are the caller's when given (and stay open); else a ledger is
    opened at `settings.ledger_path` (None: no ledger) and a router built from `llm_settings`.
    """
    async with contextlib.AsyncExitStack() as stack:
        if router is None:
            router = ModelRouter.from_settings(llm_settings, build_client)
            stack.push_async_callback(router.aclose)
        if ledger is None and settings.ledger_path is not None:
            ledger = UsageLedger(settings.ledger_path, detail_days=settings.ledger_detail_days)
            stack.callback(ledger.close)
        handler = RequestHandler(router, ledger=ledger, budgets=budgets, sub_rlm=sub_rlm)
        poller = Poller(settings, handler)
        stack.push_async_callback(poller.aclose)
        yield poller


@contextlib.asynccontextmanager
async def open_standalone(
    settings: PollerSettings, llm_settings: LLMSettings
) -> AsyncIterator[Poller]:
    """The poller of `rlm poller`: sub-RLMs, run budgets from session metadata, metrics.

    Sub-RLMs (unless `poller_sub_rlms` is off) take their environment, sandbox runtime and
    trajectory directory from `HostSettings` (RLM_ENVIRONMENT, RLM_RUNTIME_URL, ...). With
    the admin token they open their sessions for the tenant of each request, so one poller
    runs sub-RLMs for every tenant. The metrics endpoint runs while the poller does.
    """
    from host_poller.rlm.budget import RunBudgets

    async with contextlib.AsyncExitStack() as stack:
        metrics = PollerMetrics() if settings.poller_metrics_port is not None else None
        factory: Callable[[Profile], LLMClient] = build_client
        if metrics is not None:
            factory = _instrumented_factory(metrics)
        router = ModelRouter.from_settings(llm_settings, factory)
        stack.push_async_callback(router.aclose)
        ledger = None
        if settings.ledger_path is not None:
            ledger = UsageLedger(settings.ledger_path, detail_days=settings.ledger_detail_days)
            stack.callback(ledger.close)
        budgets = RunBudgets(adopted_idle_s=settings.poller_run_budget_idle_s)
        sub_rlm: SubRLMRunner | None = None
        if settings.poller_sub_rlms:
            sub_rlm = await stack.enter_async_context(
                _sub_rlm_runner(settings, router, budgets, ledger)
            )
        else:
            logger.info("sub-RLMs disabled: rlm_query below max_depth gets sub_rlm_unavailable")
        poller = await stack.enter_async_context(
            open_poller(
                settings,
                llm_settings,
                budgets=budgets,
                sub_rlm=sub_rlm,
                ledger=ledger,
                router=router,
            )
        )
        if metrics is not None and settings.poller_metrics_port is not None:
            metrics.bind(poller)
            server = metrics.serve(settings.poller_metrics_host, settings.poller_metrics_port)
            stack.callback(server.close)
        yield poller


def _instrumented_factory(metrics: PollerMetrics) -> Callable[[Profile], LLMClient]:
    def factory(profile: Profile) -> LLMClient:
        return metrics.instrument(build_client(profile))

    return factory


@contextlib.asynccontextmanager
async def _sub_rlm_runner(
    settings: PollerSettings,
    router: ModelRouter,
    budgets: RunBudgets,
    ledger: UsageLedger | None,
) -> AsyncIterator[SubRLMRunner]:
    from host_poller.poller.policy import TenantPolicy
    from host_poller.rlm.sub_rlm import SubRLMRunner as RLMSubRunner
    from host_poller.settings import HostSettings
    from rlm_wire.broker_client import BrokerClient

    # Sub-RLM sessions talk to the first broker URL (their calls are retried by the RLM's
    # own client); the poller's link fails over between all of them.
    broker_url = settings.broker_urls[0]
    host = HostSettings().model_copy(update={"broker_url": broker_url})
    policy = TenantPolicy.from_settings(host, settings.poller_sub_rlm_environments)
    admin = settings.tenant_token is None
    if host.environment in ("pyodide", "remote") and not host.runtime_url:
        logger.warning(
            "sub-RLMs need a sandbox runtime: RLM_RUNTIME_URL is unset, so rlm_query below "
            "max_depth will fail with sub_rlm_failed",
            extra={"environment": host.environment},
        )
    async with BrokerClient(
        broker_url,
        settings.token().get_secret_value(),
        timeout_s=host.broker_timeout_s,
        retry=host.retry_policy(),
    ) as broker:
        logger.info(
            "sub-RLMs enabled",
            extra={"environment": host.environment, "as_admin": admin,
                   "metadata_environments": sorted(policy.environments)},
        )  # fmt: skip
        yield RLMSubRunner(
            host,
            broker,
            router.client,
            budgets=budgets,
            ledger=ledger,
            admin=admin,
            policy=policy,
        )


async def serve(settings: PollerSettings, llm_settings: LLMSettings) -> None:
    """Run one poller until SIGTERM or SIGINT; in-flight calls get the grace period."""
    loop = asyncio.get_running_loop()
    async with open_standalone(settings, llm_settings) as poller:
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, poller.request_stop)
        try:
            await poller.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
