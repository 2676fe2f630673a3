"""Reading request bodies and query values: size limits, JSON, and model validation.

Every failure is an `rlm_wire.errors.HttpApiError` whose message says what was wrong and
where: 400 for a malformed body or query value, 413 past the size limit (checked while the
body streams in, so an over-long body is never held whole), 422 for a body that does not fit
the model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.requests import ClientDisconnect

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

ModelT = TypeVar("ModelT", bound=BaseModel)

#: How many field errors a 422 message lists.
_MAX_FIELD_ERRORS = 10
#: Longest whole number a query value may spell (Python refuses to parse past 4300 digits).
_MAX_INT_DIGITS = 18


class Request(Protocol):
    """What these helpers read of a request: a Starlette `Request`, or the lean
    `rlm_wire.asgi.AsgiRequest` (whose `stream` raises the same `ClientDisconnect`)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def query_params(self) -> Mapping[str, str]: ...

    def stream(self) -> AsyncIterator[bytes]: ...


class ClientDisconnected(ApiError):
    """The client hung up before its whole body arrived: its fault, not the server's.

    An `ApiError` so that every service answers it without a traceback; the status is the
    de-facto "client closed request" 499, which no client will read. Servers log it at debug
    and count it apart from their answers.
    """

    def __init__(self) -> None:
        super().__init__(
            499, ErrorCode.CLIENT_DISCONNECTED, "the client disconnected before its body arrived"
        )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body; 413 beyond `max_bytes` (declared or streamed), 400 for a bad length,
    `ClientDisconnected` if the client hangs up half-way."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, ErrorCode.BAD_REQUEST, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"body of {declared} bytes exceeds the limit of {max_bytes}",
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(
                    413,
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"body exceeds the limit of {max_bytes} bytes",
                )
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientDisconnected() from exc
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body; limits as `read_body`, 400 if empty or malformed.

    Strict JSON, as `model_validate_json` reads it: invalid UTF-8, lone surrogates
    (`"\\ud800"`, which no JSON encoder could send on), `NaN` / `Infinity` and nesting
    deeper than pydantic's recursion limit are all malformed.
    """
    raw = await read_body(request, max_bytes)
    if not raw:
        raise ApiError(400, ErrorCode.BAD_REQUEST, "the request needs a JSON body")
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}") from exc


async def read_model(
    request: Request, model: type[ModelT], max_bytes: int, *, empty: bytes | None = b"{}"
) -> ModelT:
    """The body parsed straight into `model` (no intermediate objects).

    An empty body reads as `empty` (`{}`: a model whose fields have defaults needs no body;
    `None` makes it a 400). 400 for malformed JSON, 422 naming each offending field.
    """
    raw = await read_body(request, max_bytes)
    if not raw:
        if empty is None:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "the request needs a JSON body")
        raw = empty
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ApiError(
                400, ErrorCode.BAD_REQUEST, f"malformed JSON: {errors[0]['msg']}"
            ) from exc
        raise ApiError(422, ErrorCode.INVALID_BODY, describe(exc)) from exc


def validate(model: type[ModelT], data: Any) -> ModelT:
    """`data` as `model`, or a 422 naming each offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, ErrorCode.INVALID_BODY, describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    """`loc: message` for the first few errors of `exc`, separated by `; `."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:_MAX_FIELD_ERRORS]:
        location = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def query_float(request: Request, name: str, default: float, maximum: float) -> float:
    """A non-negative number from the query string, at most `maximum`."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isascii():  # float() also reads other scripts' digits
        raise ApiError(
            400, ErrorCode.BAD_REQUEST, f"query parameter {name!r} must be a number, not {raw!r}"
        )
    try:
        value = float(raw)
    except ValueError as exc:
        raise ApiError(
            400, ErrorCode.BAD_REQUEST, f"query parameter {name!r} must be a number, not {raw!r}"
        ) from exc
    if not 0 <= value <= maximum:  # also refuses NaN
        raise ApiError(
            400,
            "bad_request",
            f"query parameter {name!r} must be between 0 and {maximum}, not {raw}",
        )
    return value


def query_int(request: Request, name: str, default: int, maximum: int) -> int:
    """A whole number from 1 to `maximum` from the query string."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # isdigit() alone also passes "²" (which int() refuses) and other scripts' digits.
    spelled = raw.isascii() and raw.isdigit() and len(raw) <= _MAX_INT_DIGITS
    if not spelled or not 1 <= int(raw) <= maximum:
        raise ApiError(
            400,
            "bad_request",
            f"query parameter {name!r} must be a whole number from 1 to {maximum}",
        )
    return int(raw)
