"""`RunInfo`: where a broker session sits in its RLM run, the one typed form of session metadata.

The host writes it when it opens a session (`CreateSession.metadata`); the broker stores it
and delivers it with every request of the session (`PendingRequest.metadata`); the poller
reads it to route, bound and meter the call. It is written by a tenant's host, so every
field is bounded here, at the wire: identifiers that reach file names or shared keys take a
fixed alphabet and length, and depths cannot be negative.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from rlm_wire.tracing import TRACEPARENT_PATTERN

#: Identifiers that may become part of a file name or a Redis key.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: An upper bound on any depth: deeper recursion is never meaningful.
MAX_DEPTH = 32


class RunBudgetInfo(BaseModel):
    """A run's budget as it travels with its sessions (unset: not bounded by this run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sub_calls: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    max_cost_usd: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)


class RunInfo(BaseModel):
    """Session metadata: the run, the session's depth in it, and the run's caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = Field(None, pattern=ID_PATTERN, description="The run's id.")
    depth: int | None = Field(
        None, ge=0, le=MAX_DEPTH, description="The RLM depth of the session (its calls: +1)."
    )
    max_depth: int | None = Field(
        None, ge=0, le=MAX_DEPTH, description="The run's max_depth (unset: no sub-RLMs)."
    )
    max_iterations: int | None = Field(None, ge=1, le=10_000)
    budget: RunBudgetInfo | None = None
    run_started_at: float | None = Field(None, ge=0, allow_inf_nan=False)
    environment: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Environment for sub-RLMs."
    )
    sub_model: str | None = Field(
        None, min_length=1, max_length=200, description="Model of the run's plain sub-calls."
    )
    parent_request_id: str | None = Field(
        None, pattern=ID_PATTERN, description="The request a sub-RLM session answers."
    )
    traceparent: str | None = Field(
        None,
        pattern=TRACEPARENT_PATTERN,
        description="W3C trace context of the run (rlm_wire.tracing): its LLM calls are spans.",
    )
