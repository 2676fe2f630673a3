"""Reading request bodies and query values: size limits, JSON, and protocol validation.

Every failure is an `ApiError` with a message that says what was wrong and where.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from broker.errors import BadRequest, PayloadTooLarge, ValidationFailed

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body; 413 beyond `max_bytes` (checked while streaming), 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise BadRequest("the request needs a JSON body")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def validate(model: type[ModelT], data: Any) -> ModelT:
    """`data` as `model`, or a 422 naming each offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:10]:
        location = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def query_float(request: Request, name: str, default: float, maximum: float) -> float:
    """A non-negative number from the query string, at most `maximum`."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name!r} must be a number, not {raw!r}") from exc
    if not 0 <= value <= maximum:  # also refuses NaN
        raise BadRequest(f"query parameter {name!r} must be between 0 and {maximum}, not {raw}")
    return value


def query_int(request: Request, name: str, default: int, maximum: int) -> int:
    """A whole number from 1 to `maximum` from the query string."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"query parameter {name!r} must be a whole number from 1 to {maximum}")
    return int(raw)
