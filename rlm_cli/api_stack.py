"""The Python API's one-liner: `rlm_cli.RLM(...).completion(context, query)` with no broker.

`host_poller.rlm.RLM` runs on a broker it is given; with none set it starts the `stack` it
was constructed with (host_poller imports neither the broker nor the CLI). `RLM` here is that
class with `embedded_stack`, the same stack as `rlm ask` starts, with the LLM of the
environment (profiles, or OPENAI_BASE_URL / OPENAI_API_KEY with RLM_MODEL).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

from host_poller.llm.errors import LLMConfigError
from host_poller.llm.profiles import HOW_TO_CONFIGURE, LLMSettings
from host_poller.rlm.api import RLM as HostRLM
from host_poller.rlm.budget import RunBudgets
from host_poller.rlm.errors import RLMConfigError
from host_poller.settings import HostSettings


@contextlib.asynccontextmanager
async def embedded_stack(
    settings: HostSettings, budgets: RunBudgets
) -> AsyncIterator[HostSettings]:
    """A local stack whose poller shares `budgets`; `settings` pointed at it."""
    from rlm_cli.embedded import host_settings_for, rlm_stack_components
    from rlm_cli.stack import LocalStack, StackConfig

    try:
        llm = LLMSettings.load()
    except LLMConfigError as exc:
        raise RLMConfigError(exc.message) from exc
    if not llm.is_configured:
        raise RLMConfigError(f"no LLM is configured: {HOW_TO_CONFIGURE}")
    components = rlm_stack_components(settings, budgets=budgets)
    async with LocalStack(StackConfig(llm_settings=llm), components) as stack:
        yield host_settings_for(stack, settings)


#: `host_poller.rlm.RLM` that starts an embedded stack when no broker is set.
RLM = functools.partial(HostRLM, stack=embedded_stack)
