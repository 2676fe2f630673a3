"""Errors of the RLM loop.

    RLMError                root
    ├── RLMConfigError      the run cannot start (no broker URL, no token, bad arguments)
    └── RLMRunError         the run broke off: the root LLM, the broker or the environment
                            failed (the cause is chained); `run_id` and the trajectory path
                            are kept so the partial run can be inspected

Stopping on a budget or on max_iterations is not an error: it is the result's `stop_reason`.
"""

from __future__ import annotations

from pathlib import Path


class RLMError(Exception):
    """Root of the RLM loop's exceptions."""


class RLMConfigError(RLMError, ValueError):
    """The RLM is configured in a way it cannot run with."""


class RLMRunError(RLMError):
    """A run failed before reaching an answer."""

    def __init__(self, message: str, *, run_id: str, trajectory_path: Path | None) -> None:
        super().__init__(f"{message} (run {run_id})")
        self.run_id = run_id
        self.trajectory_path = trajectory_path
