"""One RLM session end to end: a broker session, an environment, the loop, the clean-up.

Shared by the root run (`RLM.acompletion`) and the sub-RLMs the poller starts. The broker
session's metadata (`rlm_wire.run_info.RunInfo`) carries what the poller needs to route and
bound the session's calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import JsonValue

from host_poller.environments.base import EnvironmentSpec, create_environment
from host_poller.environments.errors import ExecutionEnvironmentError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import LLMClient
from host_poller.rlm.budget import RunTracker
from host_poller.rlm.errors import RLMConfigError, RLMRunError
from host_poller.rlm.loop import EventHook, LoopContext, LoopOutcome, run_loop
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.settings import HostSettings
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import WireError
from rlm_wire.run_info import RunInfo
from rlm_wire.runtime_models import Limits

logger = logging.getLogger(__name__)

Context = str | list[str] | dict[str, Any]


@dataclass(frozen=True)
class SessionPlan:
    """Where one session sits in its run."""

    run_id: str
    depth: int
    max_depth: int
    max_iterations: int
    environment: str
    state: dict[str, JsonValue] | None = None
    request_id: str | None = None
    sub_model: str | None = None
    tenant_id: str | None = None
    """The tenant to open the broker session for: set when the broker client holds the
    admin token (a standalone poller running sub-RLMs for every tenant)."""
    root_params: dict[str, Any] | None = None
    """Extra request fields of this session's root-model calls (sampling settings)."""
    traceparent: str | None = None
    """The run's W3C trace context (`rlm_wire.tracing`), carried to every LLM call."""
    system_prompt: str | None = None
    """The root model's instructions when the caller gave its own (sub-RLMs: built-in)."""

    def run_info(self, tracker: RunTracker) -> RunInfo:
        return RunInfo(
            run_id=self.run_id,
            depth=self.depth,
            max_depth=self.max_depth,
            max_iterations=self.max_iterations,
            budget=tracker.budget.to_wire(),
            run_started_at=tracker.started_at,
            environment=self.environment,
            sub_model=self.sub_model,
            parent_request_id=self.request_id,
            traceparent=self.traceparent,
        )


@dataclass(frozen=True)
class SessionOutcome:
    loop: LoopOutcome
    final_state: dict[str, JsonValue]
    session_id: str


def validate_context(context: Any) -> Context:
    """Accept str, list of str, or dict with str keys; anything else is a config error."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(c, str) for c in context):
        return context
    if isinstance(context, dict) and all(isinstance(k, str) for k in context):
        return context
    raise RLMConfigError("context must be a str, a list of str, or a dict with str keys")


async def run_session(
    *,
    settings: HostSettings,
    broker: BrokerClient,
    client: LLMClient,
    tracker: RunTracker,
    plan: SessionPlan,
    context: Context,
    query: str,
    trajectory: TrajectoryWriter | None = None,
    ledger: UsageLedger | None = None,
    on_event: EventHook | None = None,
) -> SessionOutcome:
    """Open a broker session and an environment, run the loop, close both."""
    if settings.broker_url is None:
        raise RLMConfigError("no broker URL: set RLM_BROKER_URL (or start a local stack)")
    path = trajectory.path if trajectory is not None else None
    try:
        created = await broker.create_session(
            ttl_s=settings.run_session_ttl_s,
            metadata=plan.run_info(tracker),
            tenant_id=plan.tenant_id,
        )
    except WireError as exc:
        raise RLMRunError(
            f"could not open a broker session: {exc}", run_id=plan.run_id, trajectory_path=path
        ) from exc
    env = create_environment(plan.environment, settings)
    try:
        await env.start(
            EnvironmentSpec(
                broker_url=settings.broker_url,
                session_token=created.token,
                depth=plan.depth,
                max_depth=plan.max_depth,
                limits=Limits(timeout_s=settings.execution_timeout_s),
                state=plan.state,
            )
        )
        await env.load_context(context)
        ctx = LoopContext(
            run_id=plan.run_id,
            depth=plan.depth,
            max_depth=plan.max_depth,
            max_iterations=plan.max_iterations,
            settings=settings,
            client=client,
            env=env,
            tracker=tracker,
            session_id=created.session_id,
            trajectory=trajectory,
            ledger=ledger,
            on_event=on_event,
            request_id=plan.request_id,
            root_params=plan.root_params,
            traceparent=plan.traceparent,
            system_prompt=plan.system_prompt,
        )
        outcome = await run_loop(ctx, context, query)
        final_state = await env.get_state()
    except ExecutionEnvironmentError as exc:
        raise RLMRunError(
            f"environment {plan.environment!r} failed: {exc}",
            run_id=plan.run_id,
            trajectory_path=path,
        ) from exc
    finally:
        try:
            await env.aclose()
        except ExecutionEnvironmentError as exc:
            # A dead runtime cannot end its session; the broker session must close anyway,
            # or what the sandbox queued would still be answered (and paid) for nobody.
            logger.warning(
                "environment not closed",
                extra={"session_id": created.session_id, "error": str(exc)},
            )
        try:
            # Closing the session cancels its queued requests at the broker.
            await broker.delete_session(created.session_id, tenant_id=plan.tenant_id)
        except WireError as exc:
            # The session expires on its own; a failed delete only keeps it a little longer.
            logger.warning(
                "broker session not deleted",
                extra={"session_id": created.session_id, "error": str(exc)},
            )
    return SessionOutcome(outcome, final_state, created.session_id)
