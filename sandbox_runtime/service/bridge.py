"""The bridge of one session: carries the sandbox's llm_query / rlm_query / call_tool calls to
the broker.

The sandbox process holds no token and no network; its calls come out through the worker's
pipe as `LLMCall`s, and this bridge enqueues them with the session's broker token through
`BrokerClient` (re-waiting on `pending`), and hands back one `LLMCallResult` per prompt. A
broker that is briefly unreachable or answers 429/503 is retried under the one
`RetryPolicy`, each enqueue keyed, up to `RLM_SANDBOX_BROKER_RETRY_DEADLINE_S`; past it,
or on a real refusal, the call becomes an error result, which the sandbox raises as
`LLMQueryError`.

The client runs over a `KeepAliveLink`: the bridge is on the critical path of every
`llm_query`, and the link costs a tenth of the CPU of the general transport.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import JsonValue, ValidationError

from rlm_repl import RetryPolicy, batch_slices
from rlm_wire import broker_models as bp
from rlm_wire.broker_client import BrokerClient
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError, WireError
from rlm_wire.link import KeepAliveLink
from rlm_wire.runtime_models import BrokerAccess, SubCallUsage
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import LLMCall, LLMCallResult

logger = logging.getLogger(__name__)

#: Keep-alive connections per session to the broker (a batch's prompts share one POST).
_MAX_CONNECTIONS = 16


class BrokerBridge:
    """Implements the worker's `Bridge` for one session with one broker session token.

    Without `access` (a session created with no broker) every call fails with `no_broker`.
    """

    def __init__(
        self,
        access: BrokerAccess | None,
        *,
        timeout_s: float,
        wait_s: float,
        retry: RetryPolicy | None,
        metrics: Metrics | None = None,
    ) -> None:
        self._access = access
        self._wait_s = wait_s
        self._metrics = metrics
        self._client = (
            BrokerClient(
                access.url,
                access.token,
                timeout_s=timeout_s,
                retry=retry,
                max_connections=_MAX_CONNECTIONS,
                transport=KeepAliveLink,
            )
            if access is not None
            else None
        )
        self._sub_calls: list[SubCallUsage] = []

    def take_sub_calls(self) -> list[SubCallUsage]:
        """The answered calls (request id, usage) since the last take: one execution's."""
        taken, self._sub_calls = self._sub_calls, []
        return taken

    async def __call__(self, call: LLMCall) -> list[LLMCallResult]:
        if self._metrics is not None:
            self._metrics.llm_calls.labels(kind=call.kind).inc(len(call.prompts))
        if self._access is None or self._client is None:
            message = "this sandbox has no broker: llm_query and rlm_query are unavailable"
            return [_error(ErrorCode.NO_BROKER, message) for _ in call.prompts]
        if call.kind == "rlm" and self._access.depth + 1 >= self._access.max_depth:
            message = (
                f"rlm_query is not allowed at depth {self._access.depth} "
                f"(max_depth {self._access.max_depth}); use llm_query"
            )
            return [_error(ErrorCode.MAX_DEPTH, message) for _ in call.prompts]
        is_tool = call.kind == "tool"
        if is_tool != (call.tool is not None) or (is_tool and len(call.prompts) != 1):
            message = "a tool call names one tool and carries one prompt (its arguments)"
            return [_error(ErrorCode.INVALID_REQUEST, message) for _ in call.prompts]
        try:
            requests = [self._request(self._access, call, p) for p in call.prompts]
        except ValidationError as exc:
            return [_error(ErrorCode.INVALID_REQUEST, _first_error(exc)) for _ in call.prompts]
        try:
            results = await self._send(self._client, call, requests)
        except ServiceResponseError as exc:
            logger.warning(
                "broker refused llm call",
                extra={"status": exc.status, "code": exc.code, "kind": call.kind},
            )
            return [_error(exc.code, exc.message) for _ in call.prompts]
        except WireError as exc:
            logger.warning("broker unreachable", extra={"error": str(exc), "kind": call.kind})
            return [_error(ErrorCode.BROKER_UNREACHABLE, str(exc)) for _ in call.prompts]
        self._sub_calls.extend(
            SubCallUsage(id=r.id, usage=r.usage.model_dump())
            for r in results
            if r.usage is not None
        )
        return [_result(result) for result in results]

    async def _send(
        self, client: BrokerClient, call: LLMCall, requests: list[bp.LLMRequest]
    ) -> list[bp.RequestResult]:
        wait = self._wait_s
        if call.batched:
            # In slices under the broker's batch and body bounds; several slices are enqueued
            # without waiting, then all re-waited below (the broker answers them in parallel).
            sizes = [len(request.model_dump_json(exclude_none=True)) for request in requests]
            slices = batch_slices(sizes)
            slice_wait = wait if len(slices) == 1 else 0.0
            first = []
            for part in slices:
                batch = [requests[i] for i in part]
                first += (await client.enqueue_batch(batch, wait_s=slice_wait)).results
        else:
            first = [await client.enqueue(request, wait_s=wait) for request in requests]
        if all(result.status != "pending" for result in first):
            return first
        waits = (client.wait_result(result, wait_s=wait) for result in first)
        return list(await asyncio.gather(*waits))

    def _request(
        self, access: BrokerAccess, call: LLMCall, prompt: str | list[dict[str, str]]
    ) -> bp.LLMRequest:
        params: dict[str, JsonValue] = {"kind": call.kind}
        if call.tool is not None:
            params["tool"] = call.tool  # the host's poller runs the run's tool of that name
        fields: dict[str, Any] = {"model": call.model, "depth": access.depth + 1, "params": params}
        if call.kind == "rlm" and call.state is not None:
            fields["state"] = call.state
        if isinstance(prompt, str):
            return bp.LLMRequest(prompt=prompt, **fields)
        messages = [bp.ChatMessage.model_validate(message) for message in prompt]
        return bp.LLMRequest(messages=messages, **fields)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def make_bridge(
    access: BrokerAccess | None, settings: RuntimeSettings, metrics: Metrics | None = None
) -> BrokerBridge:
    """The bridge of a session (or of one stateless execution) from the runtime's settings."""
    return BrokerBridge(
        access,
        timeout_s=settings.broker_timeout_s,
        wait_s=settings.broker_wait_s,
        retry=RetryPolicy(deadline_s=settings.broker_retry_deadline_s),
        metrics=metrics,
    )


def _result(result: bp.RequestResult) -> LLMCallResult:
    if result.status == "done" and result.response is not None:
        return LLMCallResult(response=result.response, error=None, state=result.state)
    if result.error is not None:
        return _error(result.error.code, result.error.message)
    return _error(ErrorCode.EMPTY_ANSWER, f"request {result.id} ended with status {result.status}")


def _error(code: str, message: str) -> LLMCallResult:
    return LLMCallResult(response=None, error={"code": code, "message": message}, state=None)


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return str(errors[0].get("msg", exc)) if errors else str(exc)
