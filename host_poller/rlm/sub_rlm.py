"""Sub-RLMs: how the poller answers an `rlm_query` with a fresh RLM session at depth + 1.

The child's context is the rlm_query prompt, its initial `state` the caller's (sent with
the request); it answers with its final answer, its usage, and the keys of `state` it
added or changed (the caller merges them; see docs/state.md). The child shares its run's
budget and trajectory when the run lives in this process, else it counts against a tracker
opened (or adopted) from the budget in the session metadata.

A runner holding the admin token (a standalone poller answering every tenant) opens each
child session for the tenant of the request it answers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection
from typing import Any

from pydantic import JsonValue

from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import LLMClient
from host_poller.poller.errors import BudgetExceeded, RequestFailed, SubRLMFailed
from host_poller.poller.hooks import CallContext, SubRLMResult
from host_poller.rlm.budget import Budget, RunBudgets, default_run_budgets
from host_poller.rlm.errors import RLMError
from host_poller.rlm.loop import EventHook
from host_poller.rlm.session import SessionPlan, run_session
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.settings import HostSettings
from rlm_repl import changed_keys
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import PendingRequest
from rlm_wire.codes import ErrorCode
from rlm_wire.run_info import RunInfo

logger = logging.getLogger(__name__)

SUB_RLM_QUERY = (
    "Do what the prompt in `context` asks (it is the request of the RLM that called you) and "
    "give its answer."
)


def prompt_text(request: PendingRequest) -> str:
    """The child's context: the prompt, or the messages as "role: content" paragraphs."""
    if request.prompt is not None:
        return request.prompt
    return "\n\n".join(f"{m.role}: {m.content}" for m in request.messages or [])


class SubRLMRunner:
    """The poller's `SubRLMRunner`: runs an rlm_query as a sub-RLM session.

    `broker` opens the child's broker session: with a tenant token (`admin=False`) for that
    tenant, with the admin token (`admin=True`) for the tenant of each request. `client_for`
    gives the child's root model for the request's `model` (the poller's
    `ModelRouter.client`).

    `environments`: the environments a child may take from the run's session metadata
    (the root's environment); `settings.environment` is always allowed, and a run naming
    another one is refused. None trusts the metadata (a stack whose runs are all this
    host's own). Session metadata is written by the tenant's host, so a poller serving
    tenants it does not trust must not let them choose `local` (code in this process).
    """

    def __init__(
        self,
        settings: HostSettings,
        broker: BrokerClient,
        client_for: Callable[[str | None], LLMClient],
        *,
        budgets: RunBudgets | None = None,
        ledger: UsageLedger | None = None,
        on_event: EventHook | None = None,
        admin: bool = False,
        environments: Collection[str] | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.client_for = client_for
        self.budgets = budgets if budgets is not None else default_run_budgets
        self.ledger = ledger
        self.on_event = on_event
        self.admin = admin
        self.environments = None if environments is None else frozenset(environments)

    def environment_for(self, requested: Any) -> str:
        """The child's environment: the run's, if allowed; raises `RequestFailed` if not."""
        own = self.settings.environment
        if not isinstance(requested, str) or requested == own:
            return own
        if self.environments is None or requested in self.environments:
            return requested
        raise RequestFailed(
            f"this poller does not run sub-RLMs in the {requested!r} environment (allowed: "
            f"{', '.join(sorted(self.environments | {own}))}; RLM_POLLER_SUB_RLM_ENVIRONMENTS)",
            code=ErrorCode.SUB_RLM_UNAVAILABLE,
        )

    async def __call__(self, request: PendingRequest, call: CallContext) -> SubRLMResult:
        info = request.metadata or RunInfo()
        # Metadata is written by the tenant's host: the operator's caps bound what it asks.
        if call.depth >= self.settings.sub_rlm_max_depth:
            raise BudgetExceeded(
                f"sub-RLM at depth {call.depth}: this host runs sub-RLMs only below depth "
                f"{self.settings.sub_rlm_max_depth} (RLM_SUB_RLM_MAX_DEPTH)"
            )
        run_id = call.run_id or uuid.uuid4().hex
        budget = Budget.from_wire(call.budget)
        environment = self.environment_for(info.environment)
        tracker, created = self.budgets.open(run_id, budget, started_at=call.run_started_at)
        trajectory: TrajectoryWriter | None = tracker.trajectory
        own_trajectory = trajectory is None
        if trajectory is None:
            name = f"{run_id}.d{call.depth}.{request.id}.jsonl"
            trajectory = TrajectoryWriter(self.settings.trajectory_dir / name)
        plan = SessionPlan(
            run_id=run_id,
            depth=call.depth,
            max_depth=min(
                call.max_depth if call.max_depth is not None else self.settings.max_depth,
                self.settings.sub_rlm_max_depth,
            ),
            max_iterations=min(
                info.max_iterations or self.settings.max_iterations,
                self.settings.sub_rlm_max_iterations,
            ),
            environment=environment,
            state=dict(request.state or {}),
            request_id=request.id,
            sub_model=info.sub_model,
            tenant_id=request.tenant_id if self.admin else None,
        )
        initial: dict[str, JsonValue] = dict(request.state or {})
        try:
            session = await run_session(
                settings=self.settings,
                broker=self.broker,
                client=self.client_for(request.model),
                tracker=tracker,
                plan=plan,
                context=prompt_text(request),
                query=SUB_RLM_QUERY,
                trajectory=trajectory,
                ledger=self.ledger,
                on_event=self.on_event,
            )
        except RLMError as exc:
            raise SubRLMFailed(f"sub-RLM at depth {call.depth} failed: {exc}") from exc
        finally:
            if created:
                self.budgets.release(run_id)
            if own_trajectory:
                trajectory.close()
        loop = session.loop
        if loop.answer is None:
            raise BudgetExceeded(f"sub-RLM at depth {call.depth} stopped: {loop.stop_detail}")
        usage = loop.root_usage + tracker.sub_call_usage(session.session_id)
        return SubRLMResult(
            response=loop.answer,
            usage=usage,
            state=changed_keys(initial, session.final_state),
        )
