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
) -> AsyncIterator[Poller]:
    """A poller with its LLM clients and ledger; all of them closed on exit.

    The ledger is `ledger` when given (shared with the caller), else one opened at
    `settings.ledger_path` (None: no ledger).
    """
    router = ModelRouter.from_settings(llm_settings, build_client)
    own_ledger = None
    if ledger is None and settings.ledger_path is not None:
        ledger = own_ledger = UsageLedger(settings.ledger_path)
    handler = RequestHandler(router, ledger=ledger, budgets=budgets, sub_rlm=sub_rlm)
    poller = Poller(settings, handler)
    try:
        yield poller
    finally:
        try:
            await poller.aclose()
        finally:
            await router.aclose()
            if own_ledger is not None:
                own_ledger.close()


async def serve(settings: PollerSettings, llm_settings: LLMSettings) -> None:
    """Run one poller until SIGTERM or SIGINT; in-flight calls get the grace period."""
    loop = asyncio.get_running_loop()
    async with open_poller(settings, llm_settings) as poller:
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, poller.request_stop)
        try:
            await poller.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
