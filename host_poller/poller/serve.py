"""Running a poller as a process: build it from settings, stop it on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from host_poller.llm.client import build_client
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import LLMSettings
from host_poller.poller.handler import RequestHandler
from host_poller.poller.hooks import BudgetLookup, SubRLMRunner
from host_poller.poller.poller import Poller
from host_poller.poller.router import ModelRouter
from host_poller.poller.settings import PollerSettings

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
            ledger = UsageLedger(settings.ledger_path)
            stack.callback(ledger.close)
        handler = RequestHandler(router, ledger=ledger, budgets=budgets, sub_rlm=sub_rlm)
        poller = Poller(settings, handler)
        stack.push_async_callback(poller.aclose)
        yield poller


@contextlib.asynccontextmanager
async def _with_sub_rlms(
    settings: PollerSettings, llm_settings: LLMSettings
) -> AsyncIterator[Poller]:
    """A poller that answers rlm_query with sub-RLMs (needs a tenant token to open sessions)."""
    from broker.client import BrokerClient
    from host_poller.rlm.budget import default_run_budgets
    from host_poller.rlm.sub_rlm import SubRLMRunner as RLMSubRunner
    from host_poller.settings import HostSettings

    async with contextlib.AsyncExitStack() as stack:
        router = ModelRouter.from_settings(llm_settings, build_client)
        stack.push_async_callback(router.aclose)
        ledger = None
        if settings.ledger_path is not None:
            ledger = UsageLedger(settings.ledger_path)
            stack.callback(ledger.close)
        sub_rlm: SubRLMRunner | None = None
        if settings.tenant_token is not None:
            host = HostSettings().model_copy(
                update={"broker_url": settings.broker_url, "tenant_token": settings.tenant_token}
            )
            broker = BrokerClient(
                settings.broker_url,
                settings.tenant_token.get_secret_value(),
                timeout_s=host.broker_timeout_s,
            )
            stack.push_async_callback(broker.aclose)
            sub_rlm = RLMSubRunner(
                host, broker, router.client, budgets=default_run_budgets, ledger=ledger
            )
        else:
            logger.warning(
                "sub-RLMs disabled: they need RLM_TENANT_TOKEN to open sessions; "
                "rlm_query below max_depth is answered with error sub_rlm_unavailable"
            )
        poller = await stack.enter_async_context(
            open_poller(
                settings,
                llm_settings,
                budgets=default_run_budgets,
                sub_rlm=sub_rlm,
                ledger=ledger,
                router=router,
            )
        )
        yield poller


async def serve(settings: PollerSettings, llm_settings: LLMSettings) -> None:
    """Run one poller until SIGTERM or SIGINT; in-flight calls get the grace period."""
    loop = asyncio.get_running_loop()
    async with _with_sub_rlms(settings, llm_settings) as poller:
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, poller.request_stop)
        try:
            await poller.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
