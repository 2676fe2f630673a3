"""The plug points of the poller's request handler: run budgets (and tools) and sub-RLMs.

The RLM loop (`host_poller.rlm`) provides both; the poller depends only on these small
protocols, so it runs (plain completions, no budgets) without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import JsonValue

from host_poller.llm.types import Usage
from rlm_wire.broker_models import PendingRequest
from rlm_wire.run_info import RunBudgetInfo


@dataclass(frozen=True)
class CallContext:
    """Who a request belongs to and where it sits in its run, from the session's metadata."""

    tenant_id: str
    session_id: str
    run_id: str | None
    depth: int
    """Depth of the call: the calling RLM's depth + 1."""
    max_depth: int | None
    """The run's max_depth; None when the session's metadata does not say (no sub-RLMs)."""
    kind: str
    """"llm" (plain completion), "rlm" (rlm_query) or "tool" (a host-side tool)."""
    budget: RunBudgetInfo | None = field(default=None, compare=False)
    """The run's `Budget` as the session's metadata carries it (None: not said)."""
    run_started_at: float | None = None
    """Unix time the run started (session metadata), for its time budget."""
    request_id: str | None = None
    """The broker request id: the run's tracker counts each answered request once."""
    traceparent: str | None = None
    """The run's W3C trace context (session metadata): the LLM call is a span of it."""
    estimated_tokens: int = 0
    """A guess of the call's size (its prompt's characters / 4): held against the run's token
    budget while the call is in flight, so a batch cannot all be admitted past the budget."""

    @property
    def wants_sub_rlm(self) -> bool:
        return self.kind == "rlm" and self.max_depth is not None and self.depth < self.max_depth


class HostTools(Protocol):
    """The host-side tools of one run (`host_poller.rlm.tools.Toolbox`)."""

    async def call(self, name: str, arguments: str) -> str:
        """Run tool `name` on its JSON arguments; its JSON result, else `RequestFailed`."""
        ...


class RunBudget(Protocol):
    """The budgets of one run; raises `host_poller.poller.errors.BudgetExceeded` when spent."""

    @property
    def tools(self) -> HostTools | None:
        """The run's host-side tools, when the run lives in this process (else None)."""
        ...

    def admit(self, call: CallContext) -> None:
        """Refuse the call if the run has no budget left for it."""
        ...

    def charge(
        self,
        call: CallContext,
        usage: Usage,
        *,
        model: str | None = None,
        latency_s: float | None = None,
    ) -> None:
        """Count a finished call's usage (and which model took how long) against the run."""
        ...


class BudgetLookup(Protocol):
    def for_call(self, call: CallContext) -> RunBudget | None:
        """The budget of the call's run, or None when there is nothing to enforce.

        A run that lives in this process has its own tracker; a run living elsewhere may be
        tracked from the budget its session metadata carries (`call.budget`).
        """
        ...


@dataclass(frozen=True)
class SubRLMResult:
    """What a sub-RLM answers an `rlm_query` with."""

    response: str
    usage: Usage
    state: dict[str, JsonValue] | None = None


class SubRLMRunner(Protocol):
    async def __call__(self, request: PendingRequest, call: CallContext) -> SubRLMResult:
        """Run a fresh sub-RLM for `request` (initial state `request.state`) to its answer."""
        ...
