"""The public face of the RLM loop: `RLM(...).completion(context, query)`."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Self

from host_poller.llm.client import OpenAIChatClient, build_client
from host_poller.llm.errors import LLMConfigError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import HOW_TO_CONFIGURE, LLMSettings, check_cost_budget
from host_poller.llm.types import LLMClient, Usage
from host_poller.rlm.budget import Budget, RunBudgets, SubCallRecord, default_run_budgets
from host_poller.rlm.errors import RLMConfigError
from host_poller.rlm.loop import EventHook
from host_poller.rlm.session import Context, SessionPlan, run_session, validate_context
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.rlm.types import RLMResult
from host_poller.settings import HostSettings
from rlm_wire.broker_client import BrokerClient
from rlm_wire.tracing import child_of, trace_id

#: A local stack for runs without a broker: entered with the run's settings and budget
#: registry, it yields the settings pointed at its broker and tenant.
EmbeddedStack = Callable[[HostSettings, RunBudgets], AbstractAsyncContextManager[HostSettings]]


@dataclass(frozen=True)
class RunHooks:
    """What a run reports to and shares with the rest of the process."""

    budgets: RunBudgets = field(default_factory=lambda: default_run_budgets)
    """Where the run's tracker is registered; the poller answering it must use the same."""
    ledger: UsageLedger | None = None
    """Records every root-model call (the poller records the sub-calls)."""
    on_event: EventHook | None = None
    """Progress: called with each trajectory event (iteration, sub_call, run_end, ...)."""


class RLM:
    """A Recursive Language Model: a root model that answers over a context with code.

    `model` is the root model: an `LLMClient`, or the name of an LLM profile (`LLMSettings`;
    None: the root profile). `sub_model` names the model the poller should answer
    `llm_query` with (carried in the session metadata; None: the poller's default).
    `environment`, `max_depth` and `max_iterations` default to `settings` (`HostSettings`
    from RLM_* variables). Runs go to the broker at `settings.broker_url` (a poller must
    answer the tenant of `settings.tenant_token`); with none set, each run starts the
    `stack` it was given (the composition root's embedded stack: Redis, broker, poller with
    sub-RLMs, the sandbox runtime for pyodide/remote; `rlm_cli.RLM` passes it), or
    `async with rlm:` keeps one for all the runs of the block.
    """

    def __init__(
        self,
        model: LLMClient | str | None = None,
        sub_model: str | None = None,
        *,
        environment: str | None = None,
        max_depth: int | None = None,
        max_iterations: int | None = None,
        budget: Budget | None = None,
        settings: HostSettings | None = None,
        hooks: RunHooks | None = None,
        root_params: dict[str, Any] | None = None,
        stack: EmbeddedStack | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else HostSettings()
        self.stack = stack
        self.system_prompt = system_prompt
        """Replaces the root's built-in instructions (`{context_info}`, `{depth}` filled in);
        sub-RLMs keep the built-in ones."""
        self.model = model
        self.sub_model = sub_model
        self.environment = environment or self.settings.environment
        self.max_depth = self.settings.max_depth if max_depth is None else max_depth
        self.max_iterations = max_iterations or self.settings.max_iterations
        if self.max_depth < 0 or self.max_iterations < 1:
            raise RLMConfigError("max_depth must be >= 0 and max_iterations >= 1")
        self.budget = budget or Budget()
        self.hooks = hooks or RunHooks()
        self.root_params = dict(root_params) if root_params else None
        """Extra request fields of the root model's calls (temperature, reasoning_effort, ...)."""
        self._exit: contextlib.AsyncExitStack | None = None
        self._stack_settings: HostSettings | None = None

    def completion(self, context: Any, query: str) -> RLMResult:
        """Run to the answer; blocking (runs its own event loop)."""
        return asyncio.run(self.acompletion(context, query))

    async def __aenter__(self) -> Self:
        """Keep one embedded stack for every run of the block (when no broker is set)."""
        if self.settings.broker_url is None and self._exit is None:
            exit_stack = contextlib.AsyncExitStack()
            factory = self._stack_factory()
            self._stack_settings = await exit_stack.enter_async_context(
                factory(self.settings, self.hooks.budgets)
            )
            self._exit = exit_stack
        return self

    def _stack_factory(self) -> EmbeddedStack:
        if self.stack is None:
            raise RLMConfigError(
                "no broker: set RLM_BROKER_URL and RLM_TENANT_TOKEN, or use `rlm_cli.RLM`, "
                "which starts an embedded stack"
            )
        return self.stack

    async def __aexit__(self, *exc_info: object) -> None:
        exit_stack, self._exit, self._stack_settings = self._exit, None, None
        if exit_stack is not None:
            await exit_stack.aclose()

    async def acompletion(
        self, context: Any, query: str, *, traceparent: str | None = None
    ) -> RLMResult:
        """Run to the answer (or a budget's end); raises `RLMRunError` if the run breaks.

        With no broker (`RLM_BROKER_URL` unset) the run gets an embedded stack of its own,
        or the one of an enclosing `async with rlm:` block. The run is a trace of its own, or
        a span of `traceparent` (W3C trace context, e.g. from the caller's request)."""
        checked = validate_context(context)
        trace = child_of(traceparent)
        if self._stack_settings is not None:
            return await self._run(self._stack_settings, checked, query, trace)
        if self.settings.broker_url is not None:
            return await self._run(self.settings, checked, query, trace)
        async with self._stack_factory()(self.settings, self.hooks.budgets) as settings:
            return await self._run(settings, checked, query, trace)

    async def _run(
        self, settings: HostSettings, checked: Context, query: str, traceparent: str
    ) -> RLMResult:
        if settings.broker_url is None or settings.tenant_token is None:
            raise RLMConfigError("RLM_BROKER_URL is set: set RLM_TENANT_TOKEN too")
        client, owned = self._root_client()
        if self.budget.max_cost_usd is not None and isinstance(client, OpenAIChatClient):
            try:
                check_cost_budget([client.profile])
            except LLMConfigError as exc:
                if owned:
                    await client.aclose()
                raise RLMConfigError(exc.message) from exc
        run_id = uuid.uuid4().hex
        tracker, _ = self.hooks.budgets.open(run_id, self.budget)
        trajectory = TrajectoryWriter(settings.trajectory_dir / f"{run_id}.jsonl")
        tracker.trajectory = trajectory
        tracker.on_sub_call = _sub_call_writer(trajectory, run_id, self.hooks.on_event)
        started = time.perf_counter()
        broker = BrokerClient(
            settings.broker_url,
            settings.tenant_token.get_secret_value(),
            timeout_s=settings.broker_timeout_s,
            retry=settings.retry_policy(),
        )
        plan = SessionPlan(
            run_id=run_id,
            depth=0,
            max_depth=self.max_depth,
            max_iterations=self.max_iterations,
            environment=self.environment,
            sub_model=self.sub_model,
            root_params=self.root_params,
            traceparent=traceparent,
            system_prompt=self.system_prompt,
        )
        emit = _emitter(trajectory, run_id, self.hooks.on_event)
        emit(
            "run_start",
            query=query,
            model=client.model,
            sub_model=self.sub_model,
            environment=self.environment,
            max_depth=self.max_depth,
            max_iterations=self.max_iterations,
            budget=self.budget.to_wire().model_dump(exclude_none=True),
            context_type=type(checked).__name__,
            context_chars=_context_chars(checked),
            trace_id=trace_id(traceparent),
        )
        try:
            session = await run_session(
                settings=settings,
                broker=broker,
                client=client,
                tracker=tracker,
                plan=plan,
                context=checked,
                query=query,
                trajectory=trajectory,
                ledger=self.hooks.ledger,
                on_event=self.hooks.on_event,
            )
            by_key = tracker.usage_by()
            loop = session.loop
            result = RLMResult(
                answer=loop.answer,
                answer_source=loop.answer_source,
                stop_reason=loop.stop_reason,
                stop_detail=loop.stop_detail,
                run_id=run_id,
                depth=0,
                iterations=loop.iterations,
                usage=tracker.usage,
                usage_by_model=_sum_by(by_key, 0),
                usage_by_depth=_sum_by(by_key, 1),
                final_state=dict(session.final_state),
                trajectory_path=trajectory.path,
                wall_s=time.perf_counter() - started,
            )
            emit("run_end", **result.to_json())
            return result
        finally:
            self.hooks.budgets.release(run_id)
            trajectory.close()
            await broker.aclose()
            if owned:
                await client.aclose()

    def _root_client(self) -> tuple[LLMClient, bool]:
        if self.model is not None and not isinstance(self.model, str):
            return self.model, False
        try:
            llm = LLMSettings.load()
            if not llm.is_configured:
                raise RLMConfigError(f"no LLM is configured: {HOW_TO_CONFIGURE}")
            profile = llm.root() if self.model is None else llm.profile(self.model)
            return build_client(profile), True
        except LLMConfigError as exc:
            raise RLMConfigError(exc.message) from exc


def _sum_by(by_key: dict[tuple[str, int], Usage], part: int) -> dict[Any, Usage]:
    out: dict[Any, Usage] = {}
    for key, usage in by_key.items():
        out[key[part]] = out.get(key[part], Usage()) + usage
    return out


def _context_chars(context: Any) -> int:
    if isinstance(context, str):
        return len(context)
    if isinstance(context, list):
        return sum(len(c) for c in context)
    return sum(len(str(v)) for v in context.values())


def _emitter(
    trajectory: TrajectoryWriter, run_id: str, on_event: EventHook | None
) -> Callable[..., None]:
    def emit(event: str, **fields: Any) -> None:
        fields = {"run_id": run_id, "depth": 0, **fields}
        trajectory.write(event, **fields)
        if on_event is not None:
            on_event(event, fields)

    return emit


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
