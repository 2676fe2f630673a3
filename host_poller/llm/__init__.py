"""LLM clients of the host side: profiles, the openai-SDK client, costs and the usage ledger."""

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
