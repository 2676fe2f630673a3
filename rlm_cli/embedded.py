"""RLM runs on the local stack (`rlm_cli.stack`): sub-RLMs and budgets wired into its poller.

    async with LocalStack(config, rlm_stack_components()) as stack:
        rlm = RLM(settings=host_settings_for(stack, environment="local"), model=root_client(stack))

`SubRLMComponent` starts after the tenant and the LLM profiles exist and before the poller,
and hands the poller a `SubRLMRunner` and the run-budget registry.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from host_poller.llm.client import build_client
from host_poller.llm.types import LLMClient
from host_poller.poller.policy import TenantPolicy
from host_poller.poller.router import ModelRouter
from host_poller.rlm.budget import RunBudgets, default_run_budgets
from host_poller.rlm.sub_rlm import SubRLMRunner
from host_poller.settings import HostSettings
from rlm_cli.stack import (
    LocalStack,
    PollerComponent,
    StackComponent,
    default_components,
)
from rlm_wire.broker_client import BrokerClient


def host_settings_for(
    stack: LocalStack, base: HostSettings | None = None, **updates: Any
) -> HostSettings:
    """`base` (default: from the environment) pointed at the stack's broker and tenant."""
    settings = base if base is not None else HostSettings()
    runtime: dict[str, Any] = {}
    if stack.runtime_url and settings.runtime_url is None:
        runtime = {
            "runtime_url": stack.runtime_url,
            "runtime_token": SecretStr(stack.runtime_token),
        }
    return settings.model_copy(
        update={
            "broker_url": stack.broker_url,
            "tenant_token": SecretStr(stack.tenant_token),
            **runtime,
            **updates,
        }
    )


def root_client(stack: LocalStack) -> LLMClient:
    """A client of the stack's root profile (the scripted LLM's when no provider is set)."""
    if stack.llm_settings is None:
        raise RuntimeError("the stack has no LLM settings yet")
    return build_client(stack.llm_settings.root())


class SubRLMComponent(StackComponent):
    """Gives the stack's poller sub-RLMs (run with `settings`) and the run budgets."""

    name = "sub_rlm"
    # host_settings_for reads the runtime's URL when the stack runs one.
    needs = ("broker", "llm", "sandbox")

    def __init__(
        self,
        poller: PollerComponent,
        *,
        settings: HostSettings | None = None,
        budgets: RunBudgets | None = None,
    ) -> None:
        self.poller = poller
        self.settings = settings
        self.budgets = budgets if budgets is not None else default_run_budgets
        self._broker: BrokerClient | None = None
        self._router: ModelRouter | None = None

    async def start(self, stack: LocalStack) -> None:
        if stack.llm_settings is None:
            raise RuntimeError("the sub_rlm component needs the llm component before it")
        settings = host_settings_for(stack, self.settings)
        self._router = ModelRouter.from_settings(stack.llm_settings, build_client)
        # The stack's poller answers every tenant (admin token), so its sub-RLMs open their
        # sessions for each request's own tenant.
        self._broker = stack.admin_client(
            timeout_s=settings.broker_timeout_s, retry=settings.retry_policy()
        )
        # The stack's tenants are tenants: the same policy as a standalone poller's decides
        # what their session metadata may ask (never `local` unless the operator lists it).
        policy = TenantPolicy.from_settings(
            settings, stack.poller_settings.poller_sub_rlm_environments
        )
        self.poller.sub_rlm = SubRLMRunner(
            settings,
            self._broker,
            self._router.client,
            budgets=self.budgets,
            admin=True,
            policy=policy,
        )
        self.poller.budgets = self.budgets

    async def stop(self) -> None:
        if self._router is not None:
            await self._router.aclose()
            self._router = None
        if self._broker is not None:
            await self._broker.aclose()
            self._broker = None


def rlm_stack_components(
    settings: HostSettings | None = None, *, budgets: RunBudgets | None = None
) -> list[StackComponent]:
    """The stack's default components with sub-RLMs and budgets wired into its poller."""
    base = settings if settings is not None else HostSettings()
    # The pyodide and remote environments need a sandbox runtime: the stack starts one
    # unless RLM_RUNTIME_URL points at another.
    needs_runtime = base.environment in ("pyodide", "remote") and base.runtime_url is None
    components = default_components(sandbox=needs_runtime)
    poller = next(c for c in components if isinstance(c, PollerComponent))
    index = components.index(poller)
    components.insert(index, SubRLMComponent(poller, settings=settings, budgets=budgets))
    return components
