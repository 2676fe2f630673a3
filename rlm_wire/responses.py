"""JSON answers, and the one table from exceptions to HTTP error answers.

Every error answer is `{"error": {"code", "message"}}` with a fitting status, never a
traceback: an `ApiError` carries its own status and code, Starlette's `HTTPException`
(unknown route, wrong method) gets a code from its status, and anything else is a logged 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

_HTTP_EXCEPTION_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def json_response(body: bytes | str | BaseModel | object, status: int = 200) -> Response:
    """A JSON response; bytes and str are sent as they are (already JSON), models dumped."""
    if isinstance(body, BaseModel):
        content: bytes | str = body.model_dump_json()
    elif isinstance(body, bytes | str):
        content = body
    else:
        content = json_bytes(body)
    return Response(content, status_code=status, media_type="application/json")


def json_bytes(body: object) -> bytes:
    """`body` as compact JSON, as every JSON answer encodes it."""
    return json.dumps(body, separators=(",", ":")).encode()


def error_body(code: str, message: str) -> bytes:
    """The error body every endpoint answers with: `{"error": {"code", "message"}}`."""
    return json_bytes({"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str) -> Response:
    """The error body every endpoint answers with."""
    return json_response(error_body(code, message), status)


def api_error_response(exc: ApiError) -> Response:
    """The error body, with the error's headers (e.g. a 429's `Retry-After`)."""
    response = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


def http_exception_response(exc: HTTPException) -> Response:
    """Starlette's exception as the error body, keeping its headers (a 405's `Allow`)."""
    code = _HTTP_EXCEPTION_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def exception_handlers(
    logger: logging.Logger, *, internal_message: str = "internal error (logged)"
) -> Mapping[Any, ExceptionHandler]:
    """Starlette `exception_handlers` for the table above; failures are logged to `logger`.

    API errors of status 500 and up are logged as warnings, unexpected exceptions with their
    traceback; the client of an unexpected one gets a 500 with `internal_message`.
    """

    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            if exc.status >= 500:
                logger.warning(
                    "request failed", extra={"path": request.url.path, "error": exc.message}
                )
            return api_error_response(exc)
        if isinstance(exc, HTTPException):
            return http_exception_response(exc)
        logger.error("unhandled error", extra={"path": request.url.path}, exc_info=exc)
        return error_response(500, ErrorCode.INTERNAL_ERROR, internal_message)

    return {ApiError: handle, HTTPException: handle, Exception: handle}
