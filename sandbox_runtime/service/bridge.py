"""The bridge of one session: carries the sandbox's llm_query / rlm_query calls to the broker.

The sandbox process holds no token and no network; its calls come out through the worker's
pipe as `LLMCall`s, and this bridge POSTs them to the broker's `/enqueue` with the session's
broker token, re-waits on `pending`, and hands back one `LLMCallResult` per prompt. Any broker
failure becomes an error result, which the sandbox raises as `LLMQueryError`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from broker import protocol as bp
from broker.client import BrokerClient
from broker.errors import BrokerResponseError, ClientError
from sandbox_runtime.protocol import BrokerAccess
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import LLMCall, LLMCallResult

logger = logging.getLogger(__name__)


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
        self._wait_s = wait_s
        self._metrics = metrics
        self._client = (
            BrokerClient(access.url, access.token, timeout_s=timeout_s, retries=retries)
            if access is not None
            else None
        )

    async def __call__(self, call: LLMCall) -> list[LLMCallResult]:
        if self._metrics is not None:
            self._metrics.llm_calls.labels(kind=call.kind).inc(len(call.prompts))
        if self._access is None or self._client is None:
            message = "this sandbox has no broker: llm_query and rlm_query are unavailable"
            return [_error("no_broker", message) for _ in call.prompts]
        if call.kind == "rlm" and self._access.depth + 1 >= self._access.max_depth:
            message = (
                f"rlm_query is not allowed at depth {self._access.depth} "
                f"(max_depth {self._access.max_depth}); use llm_query"
            )
            return [_error("max_depth", message) for _ in call.prompts]
        try:
            requests = [self._request(self._access, call, p) for p in call.prompts]
        except ValidationError as exc:
            return [_error("invalid_request", _first_error(exc)) for _ in call.prompts]
        try:
            results = await self._send(self._client, call, requests)
        except BrokerResponseError as exc:
            logger.warning(
                "broker refused llm call",
                extra={"status": exc.status, "code": exc.code, "kind": call.kind},
            )
            return [_error(exc.code, exc.message) for _ in call.prompts]
        except ClientError as exc:
            logger.warning("broker unreachable", extra={"error": str(exc), "kind": call.kind})
            return [_error("broker_unreachable", str(exc)) for _ in call.prompts]
        return [_result(result) for result in results]

    async def _send(
        self, client: BrokerClient, call: LLMCall, requests: list[bp.LLMRequest]
    ) -> list[bp.RequestResult]:
        if call.batched:
            batch = await client.enqueue_batch(requests, wait_s=self._wait_s)
            first = list(batch.results)
        else:
            first = [await client.enqueue(r, wait_s=self._wait_s) for r in requests]
        if all(result.status != "pending" for result in first):
            return first
        return list(
            await asyncio.gather(
                *(client.wait_result(result, wait_s=self._wait_s) for result in first)
            )
        )

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
        retries=settings.broker_retries,
        metrics=metrics,
    )


def _result(result: bp.RequestResult) -> LLMCallResult:
    if result.status == "done" and result.response is not None:
        return LLMCallResult(response=result.response, error=None, state=result.state)
    if result.error is not None:
        return _error(result.error.code, result.error.message)
    return _error("empty_answer", f"request {result.id} ended with status {result.status}")


def _error(code: str, message: str) -> LLMCallResult:
    return LLMCallResult(response=None, error={"code": code, "message": message}, state=None)


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return str(errors[0].get("msg", exc)) if errors else str(exc)
