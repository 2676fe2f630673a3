"""The OpenAI-compatible wire of `rlm serve`: the chat request, and the answers built from a run.

A request is the openai SDK's `chat.completions.create(...)`; what only an RLM has comes in
extra fields (the SDK's `extra_body`): `context`, `max_iterations`, `max_depth`, `budget`.
`temperature`, `top_p`, `seed` and `reasoning_effort` apply to the root model's calls;
other sampling fields (max_tokens, ...) are accepted and not applied.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from host_poller.llm.types import Usage
from host_poller.rlm.types import Context, RLMResult


class ContextMessage(BaseModel):
    """One message of a message-list context."""

    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1, max_length=64)
    content: str


#: A context in a body: a string, chunks, a message list, or an object.
ContextBody = str | list[str] | list[ContextMessage] | dict[str, JsonValue]


def context_value(body: ContextBody) -> Context:
    """A body's context as the RLM takes it (message models as plain dicts)."""
    if isinstance(body, list) and body and isinstance(body[0], ContextMessage):
        return [m.model_dump() for m in body if isinstance(m, ContextMessage)]
    return body  # type: ignore[return-value]  # str, list[str] or dict: as they are


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content as a string or as text parts (other parts are refused)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class RunBudget(BaseModel):
    """A request's budget for its whole run (every depth); each capped by the service's."""

    model_config = ConfigDict(extra="forbid")

    max_sub_calls: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)
    max_seconds: float | None = Field(None, gt=0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class RunOptions(BaseModel):
    """What a request may choose of its run, each bounded by the service's caps."""

    model: str = Field(min_length=1, max_length=256)
    max_iterations: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=0)
    budget: RunBudget | None = None
    # Sampling settings of the root model's calls (over its profile's `params`).
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    reasoning_effort: str | None = Field(None, min_length=1, max_length=32)

    def root_params(self) -> dict[str, Any] | None:
        """The sampling settings the request sets, as request fields of the root's calls."""
        fields = ("temperature", "top_p", "seed", "reasoning_effort")
        chosen = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        return chosen or None


class RunRequest(RunOptions):
    """`POST /v1/runs`: a run in the background, followed by its id."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("rlm", min_length=1, max_length=256)
    query: str = Field(min_length=1)
    context: ContextBody


class ConversationRequest(RunOptions):
    """`POST /v1/conversations`: a conversation's model and bounds (for all its questions),
    and optionally the context its first question is asked over."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("rlm", min_length=1, max_length=256)
    context: ContextBody | None = None


class QuestionRequest(BaseModel):
    """`POST /v1/conversations/{id}/messages`: a question, with contexts of its own if any."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    context: ContextBody | None = None
    """Bound at the next index (`context_1`, ...); the first question needs one (here or at
    the conversation's creation)."""


class ChatRequest(RunOptions):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    tools: list[JsonValue] | None = None
    context: ContextBody | None = None
    """The context the RLM answers over; None: the messages before the query."""
    conversation: str | None = Field(None, min_length=1, max_length=64)
    """An open conversation (`POST /v1/conversations`): the last user message is its next
    question, on its REPL; the messages before are not re-read (the conversation keeps its
    own history), and `context`, if any, is added to it."""

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[JsonValue] | None) -> list[JsonValue] | None:
        if value:
            raise ValueError("rlm serve does not call tools: send the request without `tools`")
        return value

    def _last_user(self) -> int:
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise ValueError("messages need a user message: the last one is the query")
        return users[-1]

    def query(self) -> str:
        """The last user message's text (ValueError when there is none, or it is empty)."""
        query = self.messages[self._last_user()].text
        if not query.strip():
            raise ValueError("the last user message (the query) is empty")
        return query

    def query_and_context(self) -> tuple[str, Context]:
        """The last user message is the query; the context is `context`, else the messages
        before it (their text: one message's as a string, several as a list)."""
        last = self._last_user()
        query = self.query()
        if self.context is not None:
            return query, context_value(self.context)
        before = [m.text for m in self.messages[:last] if m.text]
        if not before:
            raise ValueError(
                "no context: send it as `context` in the body (the openai SDK's extra_body) "
                "or as messages before the query"
            )
        return query, before[0] if len(before) == 1 else before


def wire_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object, plus the run's cost and number of LLM calls."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": usage.cost_usd,
        "llm_calls": usage.calls,
    }


def finish_reason(result: RLMResult) -> str:
    """ "stop" with an answer; "length" when a budget or the iterations ran out first."""
    return "stop" if result.answer is not None else "length"


def run_summary(result: RLMResult) -> dict[str, Any]:
    """What only an RLM has, in the extra field `rlm` (clients that do not know it skip it)."""
    return {
        "run_id": result.run_id,
        "stop_reason": result.stop_reason,
        "stop_detail": result.stop_detail,
        "answer_source": result.answer_source,
        "iterations": len(result.iterations),
        "usage_by_model": {k: v.to_wire() for k, v in result.usage_by_model.items()},
        "usage_by_depth": {str(k): v.to_wire() for k, v in result.usage_by_depth.items()},
        "wall_s": round(result.wall_s, 4),
    }


def completion_body(completion_id: str, model: str, result: RLMResult) -> dict[str, Any]:
    """The `chat.completion` answer of a finished run."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer or ""},
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": wire_usage(result.usage),
        "rlm": run_summary(result),
    }


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    *,
    finish: str | None = None,
    usage: Usage | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage chunk (no choices)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = wire_usage(usage)
    if extra:
        body.update(extra)
    return body
