"""Value types shared by every LLM client: usage, completions, messages, the client protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": str}."""


@dataclass(frozen=True)
class Usage:
    """Tokens, cost and number of LLM calls; add two to aggregate."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            calls=self.calls + other.calls,
        )

    def __sub__(self, other: Usage) -> Usage:
        """What was spent since `other` (an earlier reading of the same total)."""
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            input_tokens=self.input_tokens - other.input_tokens,
            output_tokens=self.output_tokens - other.output_tokens,
            cost_usd=self.cost_usd - other.cost_usd,
            calls=self.calls - other.calls,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_wire(self) -> dict[str, int | float]:
        """The JSON form carried in `/respond` bodies, results and trajectories."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "calls": self.calls,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Usage:
        """Inverse of `to_wire`; missing fields are 0, unknown ones are ignored."""
        return cls(
            input_tokens=int(data.get("input_tokens", 0)),
            output_tokens=int(data.get("output_tokens", 0)),
            cost_usd=float(data.get("cost_usd", 0.0)),
            calls=int(data.get("calls", 0)),
        )


@dataclass(frozen=True)
class Completion:
    """One chat completion: its text and what it cost."""

    text: str
    model: str
    usage: Usage
    latency_s: float
    attempts: int
    """HTTP attempts, retries included (the openai SDK's `retries_taken` + 1)."""


class LLMClient(Protocol):
    """What the RLM loop and the poller need from a model: one completion at a time."""

    model: str

    async def complete(
        self, messages: Sequence[Message], *, params: Mapping[str, Any] | None = None
    ) -> Completion:
        """Complete `messages`; `params` are extra request fields (temperature, max_tokens)."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP connections."""
        ...
