"""The results of an RLM run: each iteration, and the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_poller.llm.types import Usage
from host_poller.rlm.budget import StopReason
from rlm_wire.runtime_models import ExecutionResult


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
