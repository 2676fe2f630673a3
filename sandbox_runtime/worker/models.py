"""What crosses the bridge: an llm_query / rlm_query call from sandboxed code, and its answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, JsonValue


class LLMCall(BaseModel):
    """One call made by sandboxed code; `prompts` has one entry unless `batched`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llm", "rlm"]
    prompts: list[str | list[dict[str, str]]]
    model: str | None = None
    batched: bool = False
    state: dict[str, JsonValue] | None = None  # the guest's `state` at call time (rlm calls)


class LLMCallResult(BaseModel):
    """The answer to one prompt: `response`, or `error` {"code", "message"}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    response: str | None = None
    error: dict[str, str] | None = None
    state: dict[str, JsonValue] | None = None  # rlm results: the child's final state


Bridge = Callable[[LLMCall], Awaitable[list[LLMCallResult]]]
"""Carries an LLMCall out of the sandbox; returns one result per prompt, in order."""
