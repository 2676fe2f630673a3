"""Reading a chat completion answer: the few fields the client uses, each checked.

An OpenAI-compatible server may answer 2xx with anything: HTML from a proxy, JSON without
choices, a tool call instead of text, usage with missing or non-numeric counts. Each of
these is an `LLMResponseError` (wire code `llm_bad_response`), never a crash of the poller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from host_poller.llm.errors import LLMResponseError

#: How much of an unreadable answer an error message quotes.
_QUOTE_CHARS = 120


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    """The text of the first choice, why it ended, and (input, output) tokens if given."""

    text: str
    finish_reason: str | None
    usage: tuple[int, int] | None


def read_answer(content: bytes, *, model: str) -> ChatAnswer:
    """The `ChatAnswer` in a chat completion body; `LLMResponseError` if it holds none."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        quoted = content[:_QUOTE_CHARS].decode("utf-8", "replace")
        raise LLMResponseError(f"response is not JSON: {quoted!r}", model=model) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMResponseError("response has no choices", model=model)
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise LLMResponseError("response has no message in its first choice", model=model)
    finish_reason = first.get("finish_reason")
    text = message.get("content")
    if not isinstance(text, str) or not text.strip():
        raise LLMResponseError(f"empty completion (finish_reason={finish_reason})", model=model)
    return ChatAnswer(
        text=text,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        usage=_usage(data.get("usage"), model),
    )


def _usage(usage: Any, model: str) -> tuple[int, int] | None:
    """(prompt, completion) tokens; None when the server sent no usage (it is estimated)."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise LLMResponseError(f"malformed usage: {usage!r:.{_QUOTE_CHARS}}", model=model)
    return _tokens(usage, "prompt_tokens", model), _tokens(usage, "completion_tokens", model)


def _tokens(usage: dict[str, Any], field: str, model: str) -> int:
    value = usage.get(field)
    # A count as the SDK's model took it: a number, or a string of one ("7").
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        count = None
    else:
        try:
            count = int(value)
        except (ValueError, OverflowError):
            count = None
    if count is None or count < 0:
        raise LLMResponseError(f"malformed usage: {field}={value!r:.{_QUOTE_CHARS}}", model=model)
    return count
