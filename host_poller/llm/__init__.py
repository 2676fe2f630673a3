"""LLM clients of the host side: profiles, the openai-SDK client, costs and the usage ledger.

The names load on first use (PEP 562): `from host_poller.llm import LLMSettings` must not
import the openai SDK (~0.7 s, every one of its types), which only building a client needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlm_wire.lazy import lazy_names

if TYPE_CHECKING:
    from host_poller.llm.client import OpenAIChatClient, build_client
    from host_poller.llm.errors import (
        LLMConfigError,
        LLMConnectionError,
        LLMError,
        LLMRateLimitError,
        LLMResponseError,
        LLMStatusError,
        LLMTimeoutError,
    )
    from host_poller.llm.ledger import DIMENSIONS, UsageLedger
    from host_poller.llm.pricing import cost_usd
    from host_poller.llm.profiles import LLMSettings, Profile
    from host_poller.llm.types import Completion, LLMClient, Message, Usage

# Public name -> the submodule that defines it.
_HOMES = {
    "OpenAIChatClient": "client",
    "build_client": "client",
    "LLMConfigError": "errors",
    "LLMConnectionError": "errors",
    "LLMError": "errors",
    "LLMRateLimitError": "errors",
    "LLMResponseError": "errors",
    "LLMStatusError": "errors",
    "LLMTimeoutError": "errors",
    "DIMENSIONS": "ledger",
    "UsageLedger": "ledger",
    "cost_usd": "pricing",
    "LLMSettings": "profiles",
    "Profile": "profiles",
    "Completion": "types",
    "LLMClient": "types",
    "Message": "types",
    "Usage": "types",
}

__all__ = [
    "DIMENSIONS",
    "Completion",
    "LLMClient",
    "LLMConfigError",
    "LLMConnectionError",
    "LLMError",
    "LLMRateLimitError",
    "LLMResponseError",
    "LLMSettings",
    "LLMStatusError",
    "LLMTimeoutError",
    "Message",
    "OpenAIChatClient",
    "Profile",
    "Usage",
    "UsageLedger",
    "build_client",
    "cost_usd",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
