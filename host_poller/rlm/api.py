"""The public face of the RLM loop: `RLM(...).completion(context, query)`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Self

from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import LLMClient
from host_poller.rlm.budget import Budget, RunBudgets, default_run_budgets
from host_poller.rlm.conversation import Conversation
from host_poller.rlm.errors import RLMConfigError
from host_poller.rlm.loop import EventHook
from host_poller.rlm.run import RunScope
from host_poller.rlm.session import run_session, validate_contexts
from host_poller.rlm.tools import ToolsArgument, tools_from
from host_poller.rlm.types import Context, Contexts, RLMResult
from host_poller.settings import HostSettings
from rlm_wire.tracing import child_of

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
        tools: ToolsArgument | None = None,
    ) -> None:
        self.settings = settings if settings is not None else HostSettings()
        self.stack = stack
        self.system_prompt = system_prompt
        """Replaces the root's built-in instructions (`{context_info}`, `{depth}` filled in);
        sub-RLMs keep the built-in ones."""
        self.tools = tools_from(
            tools,
            timeout_s=self.settings.tool_timeout_s,
            max_result_bytes=self.settings.tool_max_result_bytes,
        )
        """Host-side tools: callables (or a dict name -> callable) that model code calls by
        name; they run in this process (`host_poller.rlm.tools`)."""
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

        `context` is a str, a list of str chunks, a message list, a dict with str keys, or
        `Contexts(...)` of several (bound as `context_0`, `context_1`, ...). With no broker
        (`RLM_BROKER_URL` unset) the run gets an embedded stack of its own, or the one of an
        enclosing `async with rlm:` block. The run is a trace of its own, or a span of `traceparent`
        (W3C trace context, e.g. from the caller's request)."""
        contexts = validate_contexts(context)
        trace = child_of(traceparent)
        async with self.stack_settings() as settings:
            return await self._run(settings, contexts, query, trace)

    def conversation(self, *, traceparent: str | None = None) -> Conversation:
        """Several questions on one REPL: `with rlm.conversation() as chat:
        chat.ask(query, context=book)` (or `async with` and `await chat.aask(...)`);
        variables and contexts stay between questions, and the budget spans them all."""
        return Conversation(self, traceparent=traceparent)

    @contextlib.asynccontextmanager
    async def stack_settings(self) -> AsyncIterator[HostSettings]:
        """The settings a run uses: the enclosing `async with rlm:` block's stack, the
        configured broker, or an embedded stack started for the caller (and stopped after)."""
        if self._stack_settings is not None:
            yield self._stack_settings
        elif self.settings.broker_url is not None:
            yield self.settings
        else:
            async with self._stack_factory()(self.settings, self.hooks.budgets) as settings:
                yield settings

    async def _run(
        self,
        settings: HostSettings,
        contexts: tuple[Context, ...],
        query: str,
        traceparent: str,
    ) -> RLMResult:
        run = await RunScope.open(self, settings, traceparent)
        try:
            run.emit_start(query, contexts)
            session = await run_session(
                settings=settings,
                broker=run.broker,
                client=run.client,
                tracker=run.tracker,
                plan=run.plan(),
                context=Contexts(*contexts) if len(contexts) > 1 else contexts[0],
                query=query,
                trajectory=run.trajectory,
                ledger=self.hooks.ledger,
                on_event=self.hooks.on_event,
            )
            result = run.result(session.loop, dict(session.final_state))
            run.emit("run_end", **result.to_json())
            return result
        finally:
            await run.close()
