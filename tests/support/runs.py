"""Real RLM runs on a local stack whose LLM is the scripted one, for tests that need a run."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host_poller.llm.client import build_client
from host_poller.llm.profiles import LLMSettings, Profile
from host_poller.llm.types import LLMClient
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RLM, RunBudgets, RunHooks
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components
from rlm_cli.stack import LocalStack, StackConfig


@dataclass
class ScriptedStack:
    """The stack, the root model's profile and client, and the settings runs use."""

    stack: LocalStack
    profile: Profile
    client: LLMClient
    settings: HostSettings
    budgets: RunBudgets

    def rlm(self, **options: Any) -> RLM:
        """An RLM on this stack (its environment, depth 2 unless `options` say otherwise)."""
        defaults: dict[str, Any] = {"environment": self.settings.environment, "max_depth": 2}
        return RLM(
            model=self.client,
            settings=self.settings,
            hooks=RunHooks(budgets=self.budgets),
            **(defaults | options),
        )

    @property
    def llm_url(self) -> str:
        """The scripted LLM's base URL, without `/v1` (its `/_fake/stats` lives there)."""
        return self.profile.base_url.removesuffix("/v1")


@asynccontextmanager
async def scripted_stack(
    redis_url: str,
    directory: Path,
    scenario: dict[str, Any],
    *,
    root_prices: tuple[float, float] | None = None,
    environment: str = "local",
) -> AsyncIterator[ScriptedStack]:
    """Redis (at `redis_url`), broker, poller with sub-RLMs and the scripted LLM playing
    `scenario` (and the sandbox runtime for `environment` pyodide or remote); trajectories
    under `directory / "trajectories"`. `root_prices` (input,
    output USD per million tokens) gives the root model a cost."""
    path = directory / f"{scenario['name']}.json"
    path.write_text(json.dumps(scenario))
    host = HostSettings(environment=environment, trajectory_dir=directory / "trajectories")
    budgets = RunBudgets()
    config = StackConfig(
        redis_url=redis_url,
        scenario=str(path),
        llm_settings=LLMSettings(llm_profiles=()),
        poller_settings=PollerSettings(poller_wait_s=0.5, poller_grace_s=2.0),
    )
    async with LocalStack(config, rlm_stack_components(host, budgets=budgets)) as stack:
        assert stack.llm_settings is not None
        profile = stack.llm_settings.root()
        if root_prices is not None:
            prices = {
                "input_price_per_mtok": root_prices[0],
                "output_price_per_mtok": root_prices[1],
            }
            profile = profile.model_copy(update=prices)
        client = build_client(profile)
        try:
            yield ScriptedStack(stack, profile, client, host_settings_for(stack, host), budgets)
        finally:
            await client.aclose()
