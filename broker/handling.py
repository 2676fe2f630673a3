"""The per-endpoint wrappers: errors become JSON answers, and every answer is counted.

A client that hangs up mid-body is not an error of ours: logged at debug and counted in
`rlm_broker_client_disconnects_total`, not among the answers.

The error table itself is `rlm_wire.responses`; this adds what only the broker has (Redis
outages answer 503 `redis_unavailable`, and the per-endpoint request metrics). `endpoint`
wraps the Starlette endpoints, `lean_endpoint` the hot routes served as raw ASGI
(`broker.hot_routes`); both map failures through `_failure`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from broker.context import BrokerContext, context_of
from broker.metrics import Metrics
from rlm_wire.asgi import Answer, AsgiRequest, error_answer
from rlm_wire.bodies import ClientDisconnected
from rlm_wire.errors import ApiError
from rlm_wire.responses import api_error_response

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
HotHandler = Callable[[BrokerContext, AsgiRequest], Awaitable[Answer]]


def _failure(name: str, metrics: Metrics, exc: Exception) -> ApiError:
    """The error answer for `exc`, logged (and a client's hang-up counted) as it deserves."""
    if isinstance(exc, ClientDisconnected):
        # Nobody is left to answer; counted apart from the answers, never a 500.
        logger.debug("client disconnected mid-body", extra={"endpoint": name})
        metrics.client_disconnects.labels(name).inc()
        return exc
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RedisError | ConnectionError | TimeoutError):
        logger.warning(
            "redis unavailable", extra={"endpoint": name, "error": f"{type(exc).__name__}: {exc}"}
        )
        return ApiError(503, "redis_unavailable", "the broker's Redis is unreachable; retry later")
    logger.error("unhandled error", extra={"endpoint": name}, exc_info=exc)
    return ApiError(500, "internal_error", "internal error (logged)")


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Map errors to JSON answers and count every answer by endpoint and status."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            metrics = context_of(request).metrics
            try:
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - top of a request: `_failure` logs it
                error = _failure(name, metrics, exc)
                response = api_error_response(error)
                if isinstance(error, ClientDisconnected):
                    return response
            metrics.count(name, response.status_code)
            return response

        return wrapper

    return decorate


def lean_endpoint(name: str) -> Callable[[HotHandler], HotHandler]:
    """`endpoint` for a hot route's handler: the same errors, logs and counts."""

    def decorate(handler: HotHandler) -> HotHandler:
        @functools.wraps(handler)
        async def wrapper(ctx: BrokerContext, request: AsgiRequest) -> Answer:
            try:
                answer = await handler(ctx, request)
            except Exception as exc:  # noqa: BLE001 - top of a request: `_failure` logs it
                error = _failure(name, ctx.metrics, exc)
                answer = error_answer(error)
                if isinstance(error, ClientDisconnected):
                    return answer
            ctx.metrics.count(name, answer.status)
            return answer

        return wrapper

    return decorate
