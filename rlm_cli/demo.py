"""`rlm demo`: several tenants' RLM runs at once through one broker, runtime and poller.

Each tenant gets its own generated context with a known number of occurrences of a word;
the runs go through the real path (root LLM here, sub-calls through the broker to whichever
poller answers every tenant), and each answer is checked against the known count. It is
the docker-compose demo, and the compose test runs it against the same commands started as
plain processes.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from pydantic import SecretStr

from host_poller.rlm.api import RLM
from host_poller.rlm.types import RLMResult
from host_poller.settings import HostSettings
from rlm_wire.broker_client import BrokerClient

WORD = "whale"
QUESTION = f"How many times does the word '{WORD}' appear in the context?"
_VOCABULARY = (
    "sea", "ship", "captain", "harpoon", "deck", "sail", "wave", "storm", "crew", "rope",
    "mast", "oil", "island", "boat", "ocean", "wind", "night", "morning", "voyage", "anchor",
)  # fmt: skip


@dataclass(frozen=True)
class DemoOutcome:
    tenant: str
    expected: int
    result: RLMResult

    @property
    def correct(self) -> bool:
        return (self.result.answer or "").strip() == str(self.expected)


def make_context(seed: int, words: int) -> tuple[str, int]:
    """Deterministic text of `words` words with a known number of WORD among them."""
    rng = random.Random(seed)
    chosen = [WORD if rng.random() < 0.02 else rng.choice(_VOCABULARY) for _ in range(words)]
    lines = [" ".join(chosen[i : i + 12]) for i in range(0, len(chosen), 12)]
    return "\n".join(lines), chosen.count(WORD)


async def run_demo(
    settings: HostSettings, admin_token: str, *, tenants: int, words: int
) -> list[DemoOutcome]:
    """Create `tenants` tenants and run one RLM per tenant, all at once."""
    if settings.broker_url is None:
        raise ValueError("RLM_BROKER_URL must point at a running broker")
    async with BrokerClient(settings.broker_url, admin_token) as admin:
        created = [await admin.create_tenant(f"demo-{i}") for i in range(tenants)]

    async def one(index: int, token: str) -> DemoOutcome:
        context, expected = make_context(seed=index, words=words)
        tenant_settings = settings.model_copy(update={"tenant_token": SecretStr(token)})
        result = await RLM(settings=tenant_settings).acompletion(context, QUESTION)
        return DemoOutcome(f"demo-{index}", expected, result)

    return list(await asyncio.gather(*(one(i, tenant.token) for i, tenant in enumerate(created))))
