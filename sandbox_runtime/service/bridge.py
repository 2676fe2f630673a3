"""The bridge of one session: carries the sandbox's llm_query / rlm_query calls to the broker.

The sandbox process holds no token and no network; its calls come out through the worker's
pipe as `LLMCall`s, and this bridge POSTs them to the broker's `/enqueue` with the session's
broker token, re-waits on `pending`, and hands back one `LLMCallResult` per prompt. Any broker
failure becomes an error result, which the sandbox raises as `LLMQueryError`.

The calls travel over a `KeepAliveLink` (keep-alive connections of its own, no general HTTP
client on this path): the bridge is on the critical path of every `llm_query`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from rlm_wire import broker_models as bp
from rlm_wire.api_client import error_from_body
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable, WireError
from rlm_wire.link import KeepAliveLink
from rlm_wire.runtime_models import BrokerAccess, SubCallUsage
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import LLMCall, LLMCallResult

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Extra seconds a request may take beyond the broker's long-poll wait.
_WAIT_SLACK_S = 10.0
#: First pause between retries of a re-wait after a connection failure (doubles, max 2 s).
_RETRY_PAUSE_S = 0.05


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
        retries: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._access = access
        self._wait_param = f"wait={wait_s:g}"
        self._timeout_s = timeout_s + wait_s + _WAIT_SLACK_S
        self._retries = retries
        self._metrics = metrics
        self._link = (
            KeepAliveLink(access.url, access.token, unreachable=ServiceUnreachable)
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
        if self._access is None or self._link is None:
            message = "this sandbox has no broker: llm_query and rlm_query are unavailable"
            return [_error(ErrorCode.NO_BROKER, message) for _ in call.prompts]
        if call.kind == "rlm" and self._access.depth + 1 >= self._access.max_depth:
            message = (
                f"rlm_query is not allowed at depth {self._access.depth} "
                f"(max_depth {self._access.max_depth}); use llm_query"
            )
            return [_error(ErrorCode.MAX_DEPTH, message) for _ in call.prompts]
        try:
            requests = [self._request(self._access, call, p) for p in call.prompts]
        except ValidationError as exc:
            return [_error(ErrorCode.INVALID_REQUEST, _first_error(exc)) for _ in call.prompts]
        try:
            results = await self._send(call, requests)
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

    async def _send(self, call: LLMCall, requests: list[bp.LLMRequest]) -> list[bp.RequestResult]:
        if call.batched:
            batch = await self._enqueue(bp.EnqueueBatch(batch=requests), bp.BatchResults)
            first = list(batch.results)
        else:
            first = [await self._enqueue(r, bp.RequestResult) for r in requests]
        if all(result.status != "pending" for result in first):
            return first
        return list(await asyncio.gather(*(self._wait_result(result) for result in first)))

    async def _enqueue(self, body: BaseModel, model: type[ModelT]) -> ModelT:
        """POST /enqueue; retried with its `Idempotency-Key`, so never enqueued twice."""
        content = body.model_dump_json(exclude_none=True).encode()
        key = {"Idempotency-Key": uuid.uuid4().hex}
        status, answer = await self._send_retrying(
            "POST", f"/enqueue?{self._wait_param}", content, key
        )
        return _parse(status, answer, model)

    async def _wait_result(self, result: bp.RequestResult) -> bp.RequestResult:
        """Re-wait on a `pending` result (GET /requests/{id}) until it is done or failed."""
        target = f"/requests/{quote(result.id, safe='')}?{self._wait_param}"
        while result.status == "pending":
            status, answer = await self._send_retrying("GET", target, None, None)
            result = _parse(status, answer, bp.RequestResult)
        return result

    async def _send_retrying(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        """One exchange, retried with backoff while the broker is unreachable."""
        assert self._link is not None
        for attempt in range(self._retries + 1):
            try:
                return await self._link.request(
                    method, target, body, timeout_s=self._timeout_s, headers=headers
                )
            except ServiceUnreachable:
                if attempt == self._retries:
                    raise
                await asyncio.sleep(min(2.0, _RETRY_PAUSE_S * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(
        self, access: BrokerAccess, call: LLMCall, prompt: str | list[dict[str, str]]
    ) -> bp.LLMRequest:
        fields: dict[str, Any] = {
            "model": call.model,
            "depth": access.depth + 1,
            "params": {"kind": call.kind},
        }
        if call.kind == "rlm" and call.state is not None:
            fields["state"] = call.state
        if isinstance(prompt, str):
            return bp.LLMRequest(prompt=prompt, **fields)
        messages = [bp.ChatMessage.model_validate(message) for message in prompt]
        return bp.LLMRequest(messages=messages, **fields)

    async def aclose(self) -> None:
        if self._link is not None:
            await self._link.aclose()


def make_bridge(
    access: BrokerAccess | None, settings: RuntimeSettings, metrics: Metrics | None = None
) -> BrokerBridge:
    """The bridge of a session (or of one stateless execution) from the runtime's settings."""
    return BrokerBridge(
        access,
        timeout_s=settings.broker_timeout_s,
        wait_s=settings.broker_wait_s,
        retries=settings.broker_retries,
        metrics=metrics,
    )


def _parse(status: int, answer: bytes, model: type[ModelT]) -> ModelT:
    """The broker's answer as `model`, or its error body as `ServiceResponseError`."""
    if status >= 400:
        raise error_from_body(ServiceResponseError, status, answer)
    try:
        return model.model_validate_json(answer)
    except ValidationError as exc:
        raise ServiceResponseError(status, ErrorCode.UNEXPECTED_BODY, _first_error(exc)) from exc


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
