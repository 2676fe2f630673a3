"""Runs RLMs for `rlm serve`: picks the root model, bounds each run, and counts runs in flight.

One `RLMService` per app. It holds one LLM client per profile (built on first use, closed
with the service), the run-budget registry it shares with the poller that answers the
runs' sub-calls (so a run's budget covers every depth), and the slots of `concurrency`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from host_poller.llm.client import build_client
from host_poller.llm.errors import LLMConfigError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import LLMSettings, Profile, check_cost_budget
from host_poller.llm.types import LLMClient
from host_poller.rlm.api import RLM, RunHooks
from host_poller.rlm.budget import Budget, RunBudgets
from host_poller.rlm.errors import RLMConfigError, RLMRunError
from host_poller.rlm.loop import EventHook
from host_poller.rlm.types import Context, RLMResult, context_chars
from host_poller.service.auth import Authenticator, Caller
from host_poller.service.models import (
    ChatRequest,
    ConversationRequest,
    RunBudget,
    RunOptions,
    RunRequest,
    context_value,
)
from host_poller.service.settings import ServeSettings
from host_poller.settings import HostSettings
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)

#: The model name of the root profile; `rlm/<profile>` names another profile.
MODEL = "rlm"


@dataclass(frozen=True)
class RunPlan:
    """One request, checked against the service's bounds: what to run."""

    model: str
    profile: Profile
    query: str
    context: Any
    max_iterations: int
    max_depth: int
    budget: Budget
    root_params: dict[str, Any] | None = None
    traceparent: str | None = None
    """The caller's W3C trace context: the run is a span of it (else a trace of its own)."""
    tenant_token: SecretStr | None = None
    """The token the run is opened with at the broker: the calling tenant's (None: the
    service's own, RLM_TENANT_TOKEN)."""

    def traced(self, traceparent: str | None) -> RunPlan:
        return dataclasses.replace(self, traceparent=traceparent)

    def for_caller(self, caller: Caller) -> RunPlan:
        """The plan as the caller's run: a tenant's runs are opened with its token."""
        return dataclasses.replace(self, tenant_token=caller.tenant_token)


class RLMService:
    """What the routes call: `auth` the caller, `plan` a request, hold a `slot`, `run` it."""

    def __init__(
        self,
        settings: ServeSettings,
        host: HostSettings,
        llm: LLMSettings,
        *,
        budgets: RunBudgets | None = None,
        ledger: UsageLedger | None = None,
        client_factory: Callable[[Profile], LLMClient] = build_client,
    ) -> None:
        if not llm.is_configured:
            raise ValueError("rlm serve needs an LLM: no profile is configured")
        self.settings = settings
        self.host = host
        self.llm = llm
        self.budgets = budgets if budgets is not None else RunBudgets()
        # Tenant tokens are checked at the broker the runs go to (the stack's, when embedded).
        self.auth = Authenticator(settings, host.broker_url, timeout_s=host.broker_timeout_s)
        self.ledger = ledger
        self._factory = client_factory
        self._clients: dict[str, LLMClient] = {}
        self.in_flight = 0

    # --- models ---------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """`rlm` (the root profile), then `rlm/<profile>` for every profile."""
        return [MODEL, *(f"{MODEL}/{name}" for name in self.llm.profiles)]

    def profile_for(self, model: str) -> Profile:
        if model == MODEL:
            return self.llm.root()
        prefix = f"{MODEL}/"
        name = model.removeprefix(prefix) if model.startswith(prefix) else None
        if name is None or name not in self.llm.profiles:
            raise ApiError(
                404,
                ErrorCode.MODEL_NOT_FOUND,
                f"no model {model!r}: use {MODEL!r} or one of "
                f"{', '.join(repr(m) for m in self.model_names()[1:])}",
            )
        return self.llm.profile(name)

    def client(self, profile: Profile) -> LLMClient:
        client = self._clients.get(profile.name)
        if client is None:
            try:
                client = self._clients[profile.name] = self._factory(profile)
            except LLMConfigError as exc:
                raise ApiError(500, ErrorCode.INTERNAL_ERROR, exc.message) from exc
        return client

    # --- bounds ---------------------------------------------------------------------------

    def plan(self, request: ChatRequest) -> RunPlan:
        """The request's run, or an `ApiError` (400, 404, 413) saying which bound it breaks."""
        if len(request.messages) > self.settings.max_messages:
            raise _bad(f"{len(request.messages)} messages; at most {self.settings.max_messages}")
        profile = self.profile_for(request.model)
        try:
            query, context = request.query_and_context()
        except ValueError as exc:
            raise _bad(str(exc)) from exc
        return self._plan(request, profile, query, context)

    def plan_run(self, request: RunRequest) -> RunPlan:
        """`plan` for the native run API."""
        profile = self.profile_for(request.model)
        return self._plan(request, profile, request.query, context_value(request.context))

    def plan_conversation(self, request: ConversationRequest) -> RunPlan:
        """`plan` for a conversation: its model and bounds, and the first question's context
        if the request brings it (the plan's query is unused: each question brings its own)."""
        profile = self.profile_for(request.model)
        context = context_value(request.context) if request.context is not None else None
        return self._plan(request, profile, "", context)

    def check_question(self, query: str, context: Context | None) -> None:
        """A conversation's question within RLM_SERVE_MAX_CONTEXT_CHARS (413 past it)."""
        self._check_size(query, context)

    def _plan(self, request: RunOptions, profile: Profile, query: str, context: Any) -> RunPlan:
        s = self.settings
        self._check_size(query, context)
        max_iterations = _capped(
            "max_iterations", request.max_iterations, self.host.max_iterations, s.max_iterations
        )
        max_depth = _capped("max_depth", request.max_depth, self.host.max_depth, s.max_depth)
        asked = request.budget or RunBudget()
        budget = Budget(
            max_sub_calls=_limit("budget.max_sub_calls", asked.max_sub_calls, s.max_sub_calls),
            max_tokens=_limit("budget.max_tokens", asked.max_tokens, s.max_tokens),
            max_cost_usd=_limit("budget.max_cost_usd", asked.max_cost_usd, s.max_cost_usd),
            max_seconds=_limit(
                "budget.max_seconds", asked.max_seconds, None, upper=s.run_timeout_s
            ),
        )
        if budget.max_cost_usd is not None:
            try:
                check_cost_budget([profile, self.llm.sub()])
            except LLMConfigError as exc:
                raise _bad(f"budget.max_cost_usd: {exc.message}") from exc
        return RunPlan(
            model=request.model,
            profile=profile,
            query=query,
            context=context,
            max_iterations=max_iterations,
            max_depth=max_depth,
            budget=budget,
            root_params=request.root_params(),
        )

    def _check_size(self, query: str, context: Context | None) -> None:
        size = (context_chars(context) if context is not None else 0) + len(query)
        if size > self.settings.max_context_chars:
            raise ApiError(
                413,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"context and query of {size} characters exceed the limit of "
                f"{self.settings.max_context_chars} (RLM_SERVE_MAX_CONTEXT_CHARS)",
            )

    def acquire(self) -> None:
        """Take one of `concurrency` run slots; 429 (with Retry-After) when all are taken."""
        if self.in_flight >= self.settings.concurrency:
            raise ApiError(
                429,
                ErrorCode.TOO_MANY_REQUESTS,
                f"all {self.settings.concurrency} runs of this service are busy "
                "(RLM_SERVE_CONCURRENCY); retry later",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A run slot for the block (see `acquire`)."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # --- running --------------------------------------------------------------------------

    def rlm_for(self, plan: RunPlan, on_event: EventHook | None = None) -> RLM:
        """The RLM that runs `plan` (as its caller's tenant), reporting to `on_event`."""
        host = self.host
        if plan.tenant_token is not None:
            host = host.model_copy(update={"tenant_token": plan.tenant_token})
        return RLM(
            model=self.client(plan.profile),
            environment=self.host.environment,
            max_depth=plan.max_depth,
            max_iterations=plan.max_iterations,
            budget=plan.budget,
            settings=host,
            hooks=RunHooks(budgets=self.budgets, ledger=self.ledger, on_event=on_event),
            root_params=plan.root_params,
        )

    async def run(self, plan: RunPlan, on_event: EventHook | None = None) -> RLMResult:
        """Run `plan` to its end; an `ApiError` (502, 504) when the run breaks or times out."""
        rlm = self.rlm_for(plan, on_event)
        async with self.bounded():
            result = await rlm.acompletion(plan.context, plan.query, traceparent=plan.traceparent)
        return result

    @contextlib.asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """One run (or a conversation's turn) within RLM_SERVE_RUN_TIMEOUT_S, its failures as
        `ApiError`s: 504 past the time, 400 for a bad choice, 502 when the run breaks."""
        timeout = self.settings.run_timeout_s
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError as exc:
            raise ApiError(
                504,
                ErrorCode.RUN_TIMEOUT,
                f"the run did not end within {timeout:g} s (RLM_SERVE_RUN_TIMEOUT_S)",
            ) from exc
        except RLMConfigError as exc:
            raise _bad(str(exc)) from exc
        except RLMRunError as exc:
            logger.warning("run failed", extra={"run_id": exc.run_id, "error": str(exc)})
            raise ApiError(502, ErrorCode.RUN_FAILED, str(exc)) from exc

    async def aclose(self) -> None:
        await self.auth.aclose()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _bad(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, message)


def _capped(name: str, asked: int | None, default: int, cap: int) -> int:
    """The request's value (at most `cap`), else the default (lowered to `cap`)."""
    if asked is None:
        return min(default, cap)
    if asked > cap:
        raise _bad(f"{name}={asked} is over this service's limit of {cap}")
    return asked


def _limit(name: str, asked: float | None, cap: float | None, *, upper: float | None = None) -> Any:
    """A budget value: the request's (at most the cap), else the cap (None: unbounded)."""
    bound = cap if cap is not None else upper
    if asked is None:
        return cap
    if bound is not None and asked > bound:
        raise _bad(f"{name}={asked:g} is over this service's limit of {bound:g}")
    return asked
