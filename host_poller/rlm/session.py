"""One RLM session end to end: a broker session, an environment, the loop, the clean-up.

Shared by the root run (`RLM.acompletion`) and the sub-RLMs the poller starts. The broker
session's metadata (`rlm_wire.run_info.RunInfo`) carries what the poller needs to route and
bound the session's calls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import JsonValue

from host_poller.environments.base import Environment, EnvironmentSpec, create_environment
from host_poller.environments.errors import ExecutionEnvironmentError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import LLMClient
from host_poller.rlm.budget import RunTracker
from host_poller.rlm.errors import RLMConfigError, RLMRunError
from host_poller.rlm.loop import EventHook, LoopContext, LoopOutcome, run_loop
from host_poller.rlm.tools import install as install_tools
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.rlm.types import Context, Contexts, Turn
from host_poller.settings import HostSettings
from rlm_repl import MAX_CONTEXTS, is_message
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import WireError
from rlm_wire.run_info import RunInfo
from rlm_wire.runtime_models import Limits

logger = logging.getLogger(__name__)


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


def validate_contexts(context: Any) -> tuple[Context, ...]:
    """One context, or each of `Contexts(...)`, checked (`validate_context`)."""
    if isinstance(context, Contexts):
        return tuple(validate_context(c) for c in context)
    return (validate_context(context),)


def validate_context(context: Any) -> Context:
    """Accept str, list of str, a message list, or dict with str keys; anything else is a
    config error."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(c, str) for c in context):
        return context
    if isinstance(context, list) and context and all(is_message(c) for c in context):
        return [{"role": c["role"], "content": c["content"]} for c in context]
    if isinstance(context, dict) and all(isinstance(k, str) for k in context):
        return context
    raise RLMConfigError(
        "context must be a str, a list of str, a list of {'role': str, 'content': str} "
        "messages, or a dict with str keys"
    )


class OpenSession:
    """A broker session and its started environment: the REPL that one run's turns share.

    A run is one turn (`run_session`); a conversation is several on the same REPL, each
    adding contexts as it goes (`context_0`, `context_1`, ...).
    """

    def __init__(
        self,
        *,
        settings: HostSettings,
        broker: BrokerClient,
        plan: SessionPlan,
        session_id: str,
        env: Environment,
        trajectory: TrajectoryWriter | None,
    ) -> None:
        self.settings, self.broker, self.plan = settings, broker, plan
        self.session_id, self.env, self.trajectory = session_id, env, trajectory
        self.contexts: list[Context] = []
        """Loaded so far, by index."""

    @classmethod
    async def open(
        cls,
        *,
        settings: HostSettings,
        broker: BrokerClient,
        tracker: RunTracker,
        plan: SessionPlan,
        trajectory: TrajectoryWriter | None = None,
    ) -> OpenSession:
        """Open the broker session, then start the environment on it."""
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
        session = cls(
            settings=settings,
            broker=broker,
            plan=plan,
            session_id=created.session_id,
            env=env,
            trajectory=trajectory,
        )
        try:
            with session._translated():
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
                if tracker.tools:
                    # The run's host-side tools as REPL functions, once per session (a
                    # sub-RLM of this process shares its run's tracker, so its tools).
                    await install_tools(env, tracker.tools, settings.execution_timeout_s)
        except BaseException:
            await session.aclose()
            raise
        return session

    async def add_contexts(self, contexts: Sequence[Context]) -> tuple[int, ...]:
        """Load `contexts` at the next indices; returns the indices they got."""
        if len(self.contexts) + len(contexts) > MAX_CONTEXTS:
            raise RLMConfigError(f"a session holds at most {MAX_CONTEXTS} contexts")
        indices: list[int] = []
        with self._translated():
            for context in contexts:
                index = len(self.contexts)
                await self.env.load_context(context, index)
                self.contexts.append(context)
                indices.append(index)
        return tuple(indices)

    async def run_turn(
        self,
        *,
        client: LLMClient,
        tracker: RunTracker,
        turn: Turn,
        ledger: UsageLedger | None = None,
        on_event: EventHook | None = None,
    ) -> LoopOutcome:
        """One loop over the REPL as it is now (its contexts must be loaded)."""
        plan = self.plan
        ctx = LoopContext(
            run_id=plan.run_id,
            depth=plan.depth,
            max_depth=plan.max_depth,
            max_iterations=plan.max_iterations,
            settings=self.settings,
            client=client,
            env=self.env,
            tracker=tracker,
            session_id=self.session_id,
            trajectory=self.trajectory,
            ledger=ledger,
            on_event=on_event,
            request_id=plan.request_id,
            root_params=plan.root_params,
            traceparent=plan.traceparent,
            system_prompt=plan.system_prompt,
        )
        with self._translated():
            return await run_loop(ctx, turn)

    async def final_state(self) -> dict[str, JsonValue]:
        with self._translated():
            return await self.env.get_state()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """An environment's failure as the run's failure (`RLMRunError`)."""
        try:
            yield
        except ExecutionEnvironmentError as exc:
            path = self.trajectory.path if self.trajectory is not None else None
            raise RLMRunError(
                f"environment {self.plan.environment!r} failed: {exc}",
                run_id=self.plan.run_id,
                trajectory_path=path,
            ) from exc

    async def aclose(self) -> None:
        """End the environment, then the broker session (which cancels what it queued)."""
        try:
            await self.env.aclose()
        except ExecutionEnvironmentError as exc:
            # A dead runtime cannot end its session; the broker session must close anyway,
            # or what the sandbox queued would still be answered (and paid) for nobody.
            logger.warning(
                "environment not closed",
                extra={"session_id": self.session_id, "error": str(exc)},
            )
        try:
            await self.broker.delete_session(self.session_id, tenant_id=self.plan.tenant_id)
        except WireError as exc:
            # The session expires on its own; a failed delete only keeps it a little longer.
            logger.warning(
                "broker session not deleted",
                extra={"session_id": self.session_id, "error": str(exc)},
            )


async def run_session(
    *,
    settings: HostSettings,
    broker: BrokerClient,
    client: LLMClient,
    tracker: RunTracker,
    plan: SessionPlan,
    context: Context | Contexts,
    query: str,
    trajectory: TrajectoryWriter | None = None,
    ledger: UsageLedger | None = None,
    on_event: EventHook | None = None,
) -> SessionOutcome:
    """Open a broker session and an environment, load the context(s), run one turn, close."""
    contexts = tuple(context) if isinstance(context, Contexts) else (context,)
    session = await OpenSession.open(
        settings=settings, broker=broker, tracker=tracker, plan=plan, trajectory=trajectory
    )
    try:
        await session.add_contexts(contexts)
        turn = Turn(query=query, contexts=contexts)
        outcome = await session.run_turn(
            client=client, tracker=tracker, turn=turn, ledger=ledger, on_event=on_event
        )
        final_state = await session.final_state()
    finally:
        await session.aclose()
    return SessionOutcome(outcome, final_state, session.session_id)
