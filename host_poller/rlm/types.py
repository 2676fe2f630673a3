"""The results of an RLM run: each iteration, and the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_poller.llm.types import Usage
from host_poller.rlm.budget import StopReason
from rlm_wire.runtime_models import ExecutionResult

#: What an RLM answers over: a str, a list of str chunks, a message list (dicts of "role"
#: and "content"), or a dict with str keys.
Context = str | list[str] | list[dict[str, str]] | dict[str, Any]


def context_chars(*contexts: Context) -> int:
    """Characters over every part of `contexts` (a message's: its content; a dict's values:
    their text), as runs and services bound and report them."""
    total = 0
    for context in contexts:
        if isinstance(context, str):
            total += len(context)
        elif isinstance(context, list):
            total += sum(len(c) if isinstance(c, str) else len(c["content"]) for c in context)
        else:
            total += sum(len(str(v)) for v in context.values())
    return total


class Contexts(tuple[Context, ...]):
    """Several contexts for one run, bound as `context_0` (also `context`), `context_1`, ...

    `RLM(...).completion(Contexts(report, notes), "compare them")`: unlike a list (the chunks
    of one context), each is a context of its own, described to the model on its own.
    """

    def __new__(cls, *contexts: Context) -> Contexts:
        if not contexts:
            raise ValueError("Contexts needs at least one context")
        return super().__new__(cls, contexts)


@dataclass(frozen=True)
class Turn:
    """What one loop answers: its query, the contexts the REPL holds, the earlier turns.

    `contexts[i]` is bound as `context_<i>` (and `contexts[0]` as `context`). A conversation's
    later turns run on the same REPL: `history` holds the earlier (query, answer) pairs and
    `new_contexts` the indices this turn added.
    """

    query: str
    contexts: tuple[Context, ...]
    history: tuple[tuple[str, str | None], ...] = ()
    new_contexts: tuple[int, ...] = ()


@dataclass(frozen=True)
class CodeRun:
    """One ```repl block of an iteration and what executing it gave."""

    code: str
    result: ExecutionResult


@dataclass(frozen=True)
class Iteration:
    """One root turn: the model's reply, its code runs, and what the turn cost."""

    index: int
    response: str
    code_runs: tuple[CodeRun, ...]
    usage: Usage
    latency_s: float
    final: dict[str, Any] | None = None


@dataclass(frozen=True)
class RLMResult:
    """What a run returns: the answer (None when a budget stopped it first), and its record."""

    answer: str | None
    stop_reason: StopReason
    stop_detail: str
    run_id: str
    depth: int
    iterations: tuple[Iteration, ...]
    usage: Usage
    """Every LLM call of the run, sub-calls and sub-RLMs included (as known to this process)."""
    usage_by_model: dict[str, Usage] = field(default_factory=dict)
    usage_by_depth: dict[int, Usage] = field(default_factory=dict)
    final_state: dict[str, Any] = field(default_factory=dict)
    trajectory_path: Path | None = None
    wall_s: float = 0.0
    answer_source: str | None = None
    """How the answer came: FINAL, FINAL_VAR, answer (the dict), text, or forced."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's --json)."""
        return {
            "answer": self.answer,
            "answer_source": self.answer_source,
            "stop_reason": self.stop_reason,
            "stop_detail": self.stop_detail,
            "run_id": self.run_id,
            "depth": self.depth,
            "iterations": len(self.iterations),
            "usage": self.usage.to_wire(),
            "usage_by_model": {k: v.to_wire() for k, v in self.usage_by_model.items()},
            "usage_by_depth": {str(k): v.to_wire() for k, v in self.usage_by_depth.items()},
            "final_state": self.final_state,
            "trajectory_path": str(self.trajectory_path) if self.trajectory_path else None,
            "wall_s": round(self.wall_s, 4),
        }
