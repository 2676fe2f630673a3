"""Answering one request: budgets, then a plain completion or a sub-RLM, then the ledger.

Every failure becomes an error `Answer` with a code (see `answers.py`); no failure is ever
turned into a response string.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import JsonValue

from host_poller.llm.client import traced
from host_poller.llm.errors import LLMError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import Message, Usage
from host_poller.poller.answers import error_answer
from host_poller.poller.errors import BudgetExceeded, RequestFailed
from host_poller.poller.hooks import BudgetLookup, CallContext, RunBudget, SubRLMRunner
from host_poller.poller.router import ModelRouter
from rlm_wire.broker_models import Answer, PendingRequest
from rlm_wire.broker_models import Usage as WireUsage
from rlm_wire.codes import ErrorCode
from rlm_wire.run_info import RunInfo

logger = logging.getLogger(__name__)

#: Request params passed on to the LLM; model code cannot set anything else (model, n, ...).
LLM_PARAMS = frozenset(
    {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
     "presence_penalty", "frequency_penalty"}
)  # fmt: skip


def call_context(request: PendingRequest) -> CallContext:
    """Read the call's run, depth and kind; the session's metadata is the authority on depth.

    The metadata is set by the host when it creates the session (`RunInfo`, bounded by the
    wire model), so model code cannot lower its own depth: a session at RLM depth d issues
    calls at depth d + 1 whatever it sends.
    """
    info = request.metadata or RunInfo()
    params = request.params or {}
    kind = params.get("kind", "llm")
    return CallContext(
        tenant_id=request.tenant_id,
        session_id=request.session_id,
        run_id=info.run_id,
        depth=info.depth + 1 if info.depth is not None else max(request.depth, 0),
        max_depth=info.max_depth,
        kind=kind if isinstance(kind, str) else "llm",
        budget=info.budget,
        run_started_at=info.run_started_at,
        request_id=request.id,
        traceparent=info.traceparent,
        # A tool call spends no tokens: it holds none of the run's token budget.
        estimated_tokens=0 if kind == "tool" else estimate_tokens(request),
    )


def estimate_tokens(request: PendingRequest) -> int:
    """The prompt's tokens, roughly (4 characters a token), and one for the answer's start."""
    if request.messages is not None:
        chars = sum(len(message.content) for message in request.messages)
    else:
        chars = len(request.prompt or "")
    return chars // 4 + 1


def messages_of(request: PendingRequest) -> list[Message]:
    if request.messages is not None:
        return [{"role": m.role, "content": m.content} for m in request.messages]
    return [{"role": "user", "content": request.prompt or ""}]


def llm_params(request: PendingRequest) -> dict[str, Any]:
    params: Mapping[str, JsonValue] = request.params or {}
    return {k: v for k, v in params.items() if k in LLM_PARAMS}


class RequestHandler:
    """Turns one `PendingRequest` into one `Answer`; never raises for a request's failure."""

    def __init__(
        self,
        router: ModelRouter,
        *,
        ledger: UsageLedger | None = None,
        budgets: BudgetLookup | None = None,
        sub_rlm: SubRLMRunner | None = None,
    ) -> None:
        self.router = router
        self.ledger = ledger
        self.budgets = budgets
        self.sub_rlm = sub_rlm

    async def answer(self, request: PendingRequest) -> Answer:
        call = call_context(request)
        started = time.perf_counter()
        try:
            answer = await self._answer(request, call)
        except Exception as exc:  # noqa: BLE001 - top of a request: its failure is its answer
            answer = error_answer(request.id, exc)
            # Expected failures are one line; anything else is a bug and keeps its traceback.
            log = logger.info if isinstance(exc, (RequestFailed, LLMError)) else logger.exception
            log(
                "request failed",
                extra={"request_id": request.id, "tenant_id": call.tenant_id,
                       "code": answer.error.code if answer.error else None, "error": str(exc)},
            )  # fmt: skip
        logger.debug(
            "request answered",
            extra={"request_id": request.id, "kind": call.kind, "depth": call.depth,
                   "latency_s": round(time.perf_counter() - started, 4)},
        )  # fmt: skip
        return answer

    async def _answer(self, request: PendingRequest, call: CallContext) -> Answer:
        if call.max_depth is not None and call.depth > call.max_depth:
            raise BudgetExceeded(
                f"depth budget exceeded: a call at depth {call.depth} is beyond the run's "
                f"max_depth {call.max_depth}"
            )
        if call.wants_sub_rlm and self.sub_rlm is None:
            raise RequestFailed(
                "this poller cannot run sub-RLMs (rlm_query below max_depth); run it with "
                "sub-RLMs on (RLM_POLLER_SUB_RLMS), or lower max_depth",
                code=ErrorCode.SUB_RLM_UNAVAILABLE,
            )
        budget = self._budget(call)
        if budget is None:
            answer, _, _ = await self._work(request, call, None)
            return answer
        budget.admit(call)
        started = time.perf_counter()
        try:
            answer, usage, model = await self._work(request, call, budget)
        except BaseException:
            # Admitted calls are always charged, so the run's in-flight count stays right.
            budget.charge(call, Usage(), model=_charged_model(request, call),
                          latency_s=time.perf_counter() - started)  # fmt: skip
            raise
        # A sub-RLM's own LLM calls are charged by the RLM loop; `charge` only logs this one.
        budget.charge(call, usage, model=model, latency_s=time.perf_counter() - started)
        return answer

    async def _work(
        self, request: PendingRequest, call: CallContext, budget: RunBudget | None
    ) -> tuple[Answer, Usage, str | None]:
        """The answer, its usage, and the model that gave it (a tool: `tool:<name>`)."""
        if call.kind == "tool":
            response = await _tool_call(request, budget)
            answer = Answer(id=request.id, response=response, usage=_wire(Usage()))
            return answer, Usage(), _charged_model(request, call)
        if call.wants_sub_rlm and self.sub_rlm is not None:
            result = await self.sub_rlm(request, call)
            answer = Answer(
                id=request.id, response=result.response, usage=_wire(result.usage),
                state=result.state,
            )  # fmt: skip
            return answer, result.usage, request.model
        client = self.router.client(request.model or _sub_model(request))
        params = traced(llm_params(request), call.traceparent)
        completion = await client.complete(messages_of(request), params=params)
        if self.ledger is not None:
            self.ledger.record(
                usage=completion.usage, model=completion.model, depth=call.depth,
                tenant_id=call.tenant_id, session_id=call.session_id, run_id=call.run_id,
            )  # fmt: skip
        answer = Answer(id=request.id, response=completion.text, usage=_wire(completion.usage))
        return answer, completion.usage, completion.model

    def _budget(self, call: CallContext) -> RunBudget | None:
        if self.budgets is None or call.run_id is None:
            return None
        return self.budgets.for_call(call)


async def _tool_call(request: PendingRequest, budget: RunBudget | None) -> str:
    """A host-side tool of the call's run: only a run living in this process has its tools
    (on its tracker, found for the call's own tenant); no LLM call, no tokens, but one
    sub-call of the run (admitted and charged like any)."""
    tools = budget.tools if budget is not None else None
    if tools is None:
        raise RequestFailed(
            "host-side tools run only in the process of their RLM (the embedded stack of "
            "`rlm ask` or the Python API, `rlm serve`); this poller does not hold the run",
            code=ErrorCode.TOOL_UNAVAILABLE,
        )
    name = (request.params or {}).get("tool")
    if not isinstance(name, str):
        raise RequestFailed("a tool call must name its tool", code=ErrorCode.INVALID_REQUEST)
    return await tools.call(name, request.prompt or "")


def _charged_model(request: PendingRequest, call: CallContext) -> str | None:
    """What a call is charged to in the run's record: a tool's `tool:<name>`, else the
    model it asked for."""
    if call.kind != "tool":
        return request.model
    name = (request.params or {}).get("tool")
    return f"tool:{name[:64] if isinstance(name, str) else '?'}"


def _sub_model(request: PendingRequest) -> str | None:
    """The run's sub-call model (session metadata `sub_model`), for calls naming no model."""
    return request.metadata.sub_model if request.metadata is not None else None


def _wire(usage: Usage) -> WireUsage:
    return WireUsage.model_validate(usage.to_wire())
