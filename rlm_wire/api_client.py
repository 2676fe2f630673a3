"""The plumbing of the project's typed HTTP API clients (`BrokerClient`, `RuntimeClient`).

`ApiClient` owns one `httpx2.AsyncClient` (base URL, bearer token, timeout, connection
limits), sends JSON bodies, maps error bodies to the subclass's `ServiceResponseError`
type and connection failures to its `ServiceUnreachable` type. Calls that are safe to
repeat are tried once, then retried with jittered backoff (stamina) on connection errors;
the others are never retried (a retry could, e.g., enqueue or execute twice).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import httpx2
import stamina
from pydantic import BaseModel, ConfigDict, ValidationError

from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

ModelT = TypeVar("ModelT", bound=BaseModel)
ErrorT = TypeVar("ErrorT", bound=ServiceResponseError)

#: What a request body may be: a wire model (sent without its None fields) or raw JSON.
Body = BaseModel | bytes | None


class _ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = "error"
    message: str = ""


class _ErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    error: _ErrorInfo


class ApiClient:
    """Base of a typed client of one JSON API, holding one token and one connection pool.

    Subclasses set `unreachable` and `response_error` to their own exception types and
    build their public methods on `_call` (a model back) and `_send` (the response back).
    `retries` counts the retries after the first try of an idempotent call.
    """

    unreachable: ClassVar[type[ServiceUnreachable]] = ServiceUnreachable
    response_error: ClassVar[type[ServiceResponseError]] = ServiceResponseError

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float,
        retries: int,
        max_connections: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        all_headers = {"Authorization": f"Bearer {token}"} if token else {}
        all_headers.update(headers or {})
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=all_headers,
            timeout=httpx2.Timeout(timeout_s),
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._timeout_s = timeout_s
        self._retries = retries

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        model: type[ModelT],
        *,
        body: Body = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> ModelT:
        """The answer as `model`; an error body raises `response_error`."""
        response = await self._send(
            method,
            path,
            body=body,
            params=params,
            timeout_s=timeout_s,
            idempotent=idempotent,
            headers=headers,
        )
        return model.model_validate_json(response.content)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Body = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        idempotent: bool = True,
        check: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> httpx2.Response:
        """The response; `unreachable` if it never came, `response_error` for a status of
        400 and up unless `check` is off. `timeout_s` replaces the client's for this call."""
        content = body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel) else body
        send = functools.partial(
            self._http.request,
            method,
            path,
            content=content,
            params=params,
            headers={
                **({"Content-Type": "application/json"} if content is not None else {}),
                **(headers or {}),
            },
            timeout=self._timeout_s if timeout_s is None else timeout_s,
        )
        try:
            response = await send()  # the common case: no retry machinery on the hot path
        except httpx2.TransportError as exc:
            if not idempotent or self._retries == 0:
                raise self._unreachable(method, path, exc) from exc
            response = await self._retry(method, path, send)
        if check and response.status_code >= 400:
            raise self._error_from(response)
        return response

    async def _retry(
        self, method: str, path: str, send: Callable[[], Awaitable[httpx2.Response]]
    ) -> httpx2.Response:
        try:
            async for attempt in stamina.retry_context(
                on=httpx2.TransportError, attempts=self._retries, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    return await send()
        except httpx2.TransportError as exc:
            raise self._unreachable(method, path, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, method: str, path: str, exc: Exception) -> ServiceUnreachable:
        return self.unreachable(f"{method} {path}: {type(exc).__name__}: {exc}")

    def _error_from(self, response: httpx2.Response) -> ServiceResponseError:
        return error_from_body(
            self.response_error, response.status_code, response.content, response.reason_phrase
        )


def error_from_body(
    error_type: type[ErrorT], status: int, content: bytes, reason: str = ""
) -> ErrorT:
    """An error answer `{"error": {"code", "message"}}` as `error_type`; any other body
    gives code `unexpected_body` with the body's start (or `reason`) as the message."""
    try:
        error = _ErrorBody.model_validate_json(content).error
    except ValidationError:
        text = content[:200].decode("utf-8", "replace")
        return error_type(status, "unexpected_body", text or reason)
    return error_type(status, error.code, error.message)
