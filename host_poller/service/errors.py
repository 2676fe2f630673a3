"""Error answers of `rlm serve`, in the OpenAI form that every openai SDK reads.

`{"error": {"message", "type", "param", "code"}}`: the house's `{code, message}` plus the
`type` OpenAI clients branch on. Handlers raise `rlm_wire.errors.ApiError`; unknown routes
and wrong methods (Starlette's `HTTPException`) and unexpected failures (a logged 500) get
the same form. No message carries a provider's key: LLM errors are redacted where they are
made (`host_poller.llm.client`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(error_body(status, code, message)),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def exception_handlers(logger: logging.Logger) -> Mapping[Any, ExceptionHandler]:
    """Starlette `exception_handlers` mapping every failure to the OpenAI error form."""

    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            if exc.status >= 500:
                logger.warning(
                    "request failed",
                    extra={"path": request.url.path, "code": exc.code, "error": exc.message},
                )
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        if isinstance(exc, HTTPException):
            code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
            return error_response(exc.status_code, code, str(exc.detail), exc.headers)
        logger.error("unhandled error", extra={"path": request.url.path}, exc_info=exc)
        return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error (logged)")

    return {ApiError: handle, HTTPException: handle, Exception: handle}
