"""Sub-RLMs: how the poller answers an `rlm_query` with a fresh RLM session at depth + 1.

The child's context is the rlm_query prompt, its initial `state` the caller's (sent with
the request); it answers with its final answer, its usage, and the keys of `state` it
added or changed (the caller merges them; see docs/state.md). The child shares its run's
budget and trajectory when the run lives in this process, else it counts against a tracker
opened (or adopted) from the budget in the session metadata.

A runner holding the admin token (a standalone poller answering every tenant) opens each
child session for the tenant of the request it answers.

The session metadata is the tenant's, so what it may ask (environment, depth, iterations) is
decided by the host's `TenantPolicy`, and every name built from it is checked and scoped by
tenant: budgets are looked up by (tenant, run id), trajectories written under
`<trajectory_dir>/<tenant id>/`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import JsonValue

from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import LLMClient
from host_poller.poller.errors import BudgetExceeded, RequestFailed, SubRLMFailed
from host_poller.poller.hooks import CallContext, SubRLMResult
from host_poller.poller.policy import TenantPolicy
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
from rlm_wire.run_info import ID_PATTERN, RunInfo
from rlm_wire.tracing import child_of

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


_ID = re.compile(ID_PATTERN)


def trajectory_path(root: Path, tenant_id: str, name_parts: tuple[str, ...], depth: int) -> Path:
    """`<root>/<tenant>/<part>.<part>....d<depth>.jsonl`; every part must be an identifier
    (`rlm_wire.run_info.ID_PATTERN`), so no tenant string can leave its directory."""
    for part in (tenant_id, *name_parts):
        if not _ID.fullmatch(part):
            raise RequestFailed(
                "an identifier of this request cannot name a file", code=ErrorCode.BAD_REQUEST
            )
    run_id, *rest = name_parts
    return root / tenant_id / ".".join((run_id, f"d{depth}", *rest, "jsonl"))


class SubRLMRunner:
    """The poller's `SubRLMRunner`: runs an rlm_query as a sub-RLM session.

    `broker` opens the child's broker session: with a tenant token (`admin=False`) for that
    tenant, with the admin token (`admin=True`) for the tenant of each request. `client_for`
    gives the child's root model for the request's `model` (the poller's
    `ModelRouter.client`).

    `policy`: what the run's session metadata (written by the tenant's host) may ask:
    environments, depth and iterations. None takes the safe default built from `settings`
    (`pyodide` and `remote`, besides `settings.environment`; never `local` from metadata).
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
        policy: TenantPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.client_for = client_for
        self.budgets = budgets if budgets is not None else default_run_budgets
        self.ledger = ledger
        self.on_event = on_event
        self.admin = admin
        self.policy = policy if policy is not None else TenantPolicy.from_settings(settings)

    def environment_for(self, requested: str | None) -> str:
        """The child's environment: the run's, if the policy allows; raises `RequestFailed`."""
        return self.policy.environment_for(requested)

    async def __call__(self, request: PendingRequest, call: CallContext) -> SubRLMResult:
        info = request.metadata or RunInfo()
        # Metadata is written by the tenant's host: the operator's policy bounds what it asks,
        # before anything runs.
        self.policy.check_depth(call.depth)
        environment = self.environment_for(info.environment)
        run_id = call.run_id or uuid.uuid4().hex
        tenant = request.tenant_id
        budget = Budget.from_wire(call.budget)
        tracker, created = self.budgets.open(
            run_id, budget, started_at=call.run_started_at, tenant_id=tenant
        )
        trajectory: TrajectoryWriter | None = tracker.trajectory
        own_trajectory = trajectory is None
        if trajectory is None:
            path = trajectory_path(
                self.settings.trajectory_dir, tenant, (run_id, request.id), call.depth
            )
            try:
                trajectory = TrajectoryWriter.for_run(self.settings, path)
            except BaseException:
                if created:
                    self.budgets.release(run_id, tenant)
                raise
        plan = SessionPlan(
            run_id=run_id,
            depth=call.depth,
            max_depth=self.policy.sub_max_depth(call.max_depth, self.settings.max_depth),
            max_iterations=self.policy.sub_max_iterations(
                info.max_iterations, self.settings.max_iterations
            ),
            environment=environment,
            state=dict(request.state or {}),
            request_id=request.id,
            sub_model=info.sub_model,
            tenant_id=request.tenant_id if self.admin else None,
            traceparent=child_of(info.traceparent) if info.traceparent else None,
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
                self.budgets.release(run_id, tenant)
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
