"""The per-endpoint wrapper: errors become JSON answers, and every answer is counted.

A client that hangs up mid-body is not an error of ours: logged at debug and counted in
`rlm_broker_client_disconnects_total`, not among the answers.

The error table itself is `rlm_wire.responses`; this adds what only the broker has (Redis
outages answer 503 `redis_unavailable`, and the per-endpoint request metrics).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from broker.context import context_of
from rlm_wire.bodies import ClientDisconnected
from rlm_wire.errors import ApiError
from rlm_wire.responses import api_error_response, error_response

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Map errors to JSON answers and count every answer by endpoint and status."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            metrics = context_of(request).metrics
            try:
                response = await handler(request)
            except ClientDisconnected:
                # Nobody is left to answer; counted apart from the answers, never a 500.
                logger.debug("client disconnected mid-body", extra={"endpoint": name})
                metrics.client_disconnects.labels(name).inc()
                return api_error_response(ClientDisconnected())
            except ApiError as exc:
                response = api_error_response(exc)
            except (RedisError, ConnectionError, TimeoutError) as exc:
                logger.warning(
                    "redis unavailable",
                    extra={"endpoint": name, "error": f"{type(exc).__name__}: {exc}"},
                )
                response = error_response(
                    503, "redis_unavailable", "the broker's Redis is unreachable; retry later"
                )
            except Exception:
                logger.exception("unhandled error", extra={"endpoint": name})
                response = error_response(500, "internal_error", "internal error (logged)")
            metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return wrapper

    return decorate
