"""The one table from exceptions to HTTP answers, and the per-endpoint metrics wrapper."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from broker.context import context_of
from broker.errors import ApiError

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def json_response(body: bytes | str | object, status: int = 200) -> Response:
    """A JSON response; bytes and str are sent as they are (already JSON)."""
    content = body if isinstance(body, bytes | str) else json.dumps(body, separators=(",", ":"))
    return Response(content, status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Map errors to JSON answers and count every answer by endpoint and status."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = error_response(exc.status, exc.code, exc.message)
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
            context_of(request).metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return wrapper

    return decorate


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) as JSON too."""
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
    logger.error("unexpected exception outside an endpoint", exc_info=exc)
    return error_response(500, "internal_error", "internal error (logged)")
