"""What crosses the bridge (an llm_query / rlm_query / call_tool call from sandboxed code,
and its answers), and the bounds an execution result from a sandbox must keep."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, JsonValue

from rlm_wire.runtime_models import ExecutionResult

#: What the supervisor adds when it truncates a stream itself (`process._cap`).
_STREAM_SLACK_CHARS = 256
#: Bound on a FINAL answer's fields besides its value (`rlm_guest.runtime`).
_FINAL_META_CHARS = 1024


class LLMCall(BaseModel):
    """One call made by sandboxed code; `prompts` has one entry unless `batched`.

    A "tool" call (`call_tool`) names its host-side tool in `tool`; its one prompt is the
    arguments as JSON text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llm", "rlm", "tool"]
    prompts: list[str | list[dict[str, str]]]
    model: str | None = None
    batched: bool = False
    state: dict[str, JsonValue] | None = None  # the guest's `state` at call time (rlm calls)
    tool: str | None = None  # the host-side tool a "tool" call runs


class LLMCallResult(BaseModel):
    """The answer to one prompt: `response`, or `error` {"code", "message"}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    response: str | None = None
    error: dict[str, str] | None = None
    state: dict[str, JsonValue] | None = None  # rlm results: the child's final state


Bridge = Callable[[LLMCall], Awaitable[list[LLMCallResult]]]
"""Carries an LLMCall out of the sandbox; returns one result per prompt, in order."""


def result_violation(result: ExecutionResult, *, output_bytes: int, state_bytes: int) -> str | None:
    """What in `result` is over its bound, or None.

    The guest keeps every field within these bounds (stdout, stderr and the FINAL value within
    the execution's `output_bytes`, `state` within `state_bytes` as JSON; the error's sizes are
    the wire model's), so a result over one came from a forged frame: the caller kills the
    sandbox. Sizes are counted in characters (a UTF-8 byte bound holds no more of them).
    """
    for name in ("stdout", "stderr"):
        size = len(getattr(result, name))
        if size > output_bytes + _STREAM_SLACK_CHARS:
            return f"{name} of {size} characters, over the limit of {output_bytes}"
    if result.final is not None:
        value = result.final.get("value")
        if not isinstance(value, str):
            return "a FINAL answer without a text value"
        if len(value) > output_bytes:
            return f"a FINAL value of {len(value)} characters, over the limit of {output_bytes}"
        meta = _json_size({k: v for k, v in result.final.items() if k != "value"})
        if meta > 2 * _FINAL_META_CHARS:
            return f"FINAL fields of {meta} bytes besides the value"
    if result.state is not None:
        try:
            size = _json_size(result.state)
        except ValueError:
            return "a state that is not JSON (NaN or infinity)"
        if size > state_bytes:
            return f"a state of {size} bytes as JSON, over the limit of {state_bytes}"
    return None


def _json_size(value: Any) -> int:
    return len(json.dumps(value, allow_nan=False))
