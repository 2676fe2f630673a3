"""Exceptions that sandboxed code sees."""

from __future__ import annotations


class LLMQueryError(Exception):
    """An llm_query / rlm_query call failed; `code` says why (e.g. "no_bridge", "upstream").

    For the batched functions, `partial` holds the answers in prompt order (None where a
    prompt failed) and `index` the first failing prompt.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        index: int | None = None,
        partial: list[str | None] | None = None,
    ) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.index = index
        self.partial = partial


class StateError(ValueError):
    """The shared `state` dict holds something that is not JSON, or is too large."""
