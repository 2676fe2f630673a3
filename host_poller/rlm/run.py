"""One root run's resources, shared by a one-shot completion and a conversation's turns.

A `RunScope` holds what lives as long as the run: its id, its budget tracker (registered
where the poller answering it looks), its trajectory, its broker client and root-model
client. `RLM._run` opens one per completion; a `Conversation` keeps one for all its turns,
so the budget and the trajectory span the conversation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from host_poller.llm.client import OpenAIChatClient, build_client
from host_poller.llm.errors import LLMConfigError
from host_poller.llm.profiles import HOW_TO_CONFIGURE, LLMSettings, check_cost_budget
from host_poller.llm.types import LLMClient, Usage
from host_poller.rlm.budget import SubCallRecord
from host_poller.rlm.errors import RLMConfigError
from host_poller.rlm.loop import EventHook, LoopOutcome
from host_poller.rlm.session import SessionPlan
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.rlm.types import Context, RLMResult, context_chars
from host_poller.settings import HostSettings
from rlm_wire.broker_client import BrokerClient
from rlm_wire.tracing import trace_id

if TYPE_CHECKING:
    from host_poller.rlm.api import RLM


class RunScope:
    """The id, tracker, trajectory and clients of one root run; `close` releases them."""

    def __init__(
        self,
        rlm: RLM,
        settings: HostSettings,
        traceparent: str,
        client: LLMClient,
        owns_client: bool,
    ) -> None:
        if settings.broker_url is None or settings.tenant_token is None:
            raise RLMConfigError("RLM_BROKER_URL is set: set RLM_TENANT_TOKEN too")
        self.rlm = rlm
        self.settings = settings
        self.traceparent = traceparent
        self.client, self._owns_client = client, owns_client
        self.run_id = uuid.uuid4().hex
        self.tracker, _ = rlm.hooks.budgets.open(self.run_id, rlm.budget)
        self.tracker.tools = rlm.tools  # the poller of this process answers their calls
        self.trajectory = TrajectoryWriter.for_run(
            settings, settings.trajectory_dir / f"{self.run_id}.jsonl"
        )
        self.tracker.trajectory = self.trajectory
        self.tracker.on_sub_call = _sub_call_writer(
            self.trajectory, self.run_id, rlm.hooks.on_event
        )
        self.started = time.perf_counter()
        self.broker = BrokerClient(
            settings.broker_url,
            settings.tenant_token.get_secret_value(),
            timeout_s=settings.broker_timeout_s,
            retry=settings.retry_policy(),
        )

    @classmethod
    async def open(cls, rlm: RLM, settings: HostSettings, traceparent: str) -> RunScope:
        """The run's scope; a cost budget on a model without a known price is refused."""
        client, owned = _root_client(rlm.model)
        try:
            if rlm.budget.max_cost_usd is not None and isinstance(client, OpenAIChatClient):
                try:
                    check_cost_budget([client.profile])
                except LLMConfigError as exc:
                    raise RLMConfigError(exc.message) from exc
            return cls(rlm, settings, traceparent, client, owned)
        except BaseException:
            if owned:
                await client.aclose()
            raise

    def plan(self) -> SessionPlan:
        """The root session of this run."""
        rlm = self.rlm
        return SessionPlan(
            run_id=self.run_id,
            depth=0,
            max_depth=rlm.max_depth,
            max_iterations=rlm.max_iterations,
            environment=rlm.environment,
            sub_model=rlm.sub_model,
            root_params=rlm.root_params,
            traceparent=self.traceparent,
            system_prompt=rlm.system_prompt,
        )

    def emit(self, event: str, **fields: Any) -> None:
        """One trajectory line (and progress event) at depth 0."""
        fields = {"run_id": self.run_id, "depth": 0, **fields}
        self.trajectory.write(event, **fields)
        if self.rlm.hooks.on_event is not None:
            self.rlm.hooks.on_event(event, fields)

    def emit_start(self, query: str, contexts: tuple[Context, ...], **extra: Any) -> None:
        """The run's first event: what was asked, over what, with which bounds."""
        rlm = self.rlm
        self.emit(
            "run_start",
            query=query,
            model=self.client.model,
            sub_model=rlm.sub_model,
            environment=rlm.environment,
            max_depth=rlm.max_depth,
            max_iterations=rlm.max_iterations,
            budget=rlm.budget.to_wire().model_dump(exclude_none=True),
            context_type=type(contexts[0]).__name__,
            contexts=len(contexts),
            context_chars=context_chars(*contexts),
            trace_id=trace_id(self.traceparent),
            **extra,
        )

    def result(
        self,
        loop: LoopOutcome,
        final_state: dict[str, Any],
        *,
        usage_since: Usage | None = None,
        by_key_since: dict[tuple[str, int], Usage] | None = None,
        started: float | None = None,
    ) -> RLMResult:
        """The run's result; with `*_since` readings, only what was spent after them (a
        conversation's turn)."""
        usage = self.tracker.usage
        by_key = self.tracker.usage_by()
        if usage_since is not None:
            usage = usage - usage_since
        if by_key_since:
            by_key = {k: v - by_key_since.get(k, Usage()) for k, v in by_key.items()}
            by_key = {k: v for k, v in by_key.items() if v.calls}
        return RLMResult(
            answer=loop.answer,
            answer_source=loop.answer_source,
            stop_reason=loop.stop_reason,
            stop_detail=loop.stop_detail,
            run_id=self.run_id,
            depth=0,
            iterations=loop.iterations,
            usage=usage,
            usage_by_model=_sum_by(by_key, 0),
            usage_by_depth=_sum_by(by_key, 1),
            final_state=final_state,
            trajectory_path=self.trajectory.path,
            wall_s=time.perf_counter() - (self.started if started is None else started),
        )

    async def close(self) -> None:
        """Unregister the tracker, close the trajectory and the clients; safe to call twice."""
        self.rlm.hooks.budgets.release(self.run_id)
        self.trajectory.close()
        await self.broker.aclose()
        if self._owns_client:
            self._owns_client = False
            await self.client.aclose()


def _root_client(model: LLMClient | str | None) -> tuple[LLMClient, bool]:
    """The root model's client, and whether the run owns (and must close) it."""
    if model is not None and not isinstance(model, str):
        return model, False
    try:
        llm = LLMSettings.load()
        if not llm.is_configured:
            raise RLMConfigError(f"no LLM is configured: {HOW_TO_CONFIGURE}")
        profile = llm.root() if model is None else llm.profile(model)
        return build_client(profile), True
    except LLMConfigError as exc:
        raise RLMConfigError(exc.message) from exc


def _sum_by(by_key: dict[tuple[str, int], Usage], part: int) -> dict[Any, Usage]:
    out: dict[Any, Usage] = {}
    for key, usage in by_key.items():
        out[key[part]] = out.get(key[part], Usage()) + usage
    return out


def _sub_call_writer(
    trajectory: TrajectoryWriter, run_id: str, on_event: EventHook | None
) -> Callable[[SubCallRecord], None]:
    def write(record: SubCallRecord) -> None:
        fields = {
            "run_id": run_id,
            "depth": record.depth,
            "kind": record.kind,
            "model": record.model,
            "usage": record.usage.to_wire(),
            "latency_s": record.latency_s,
        }
        trajectory.write("sub_call", **fields)
        if on_event is not None:
            on_event("sub_call", fields)

    return write
