"""The plumbing of the project's typed HTTP API clients (`BrokerClient`, `RuntimeClient`).

`ApiClient` sends JSON bodies over a `Transport` (`rlm_wire.transport`: httpx2 by default,
`KeepAliveLink` on hot paths), maps error bodies to `ServiceResponseError` and failed
exchanges to `ServiceUnreachable`, and retries under the retry policy it is given: what
failed in a way worth another try (no answer, or one of the policy's statuses: 429, 502,
503, 504) is tried again after the policy's pause, until its deadline. Calls that are not
safe to repeat are retried only on a 429 or 503, which the service answers without doing
anything.

The one retry policy of every broker client is `rlm_repl.RetryPolicy`: it lives in the REPL
because the exec script must carry it alone in a sandbox, and `rlm_wire` never imports the
REPL, so the clients here take it through the `RetrySchedule` protocol and the services
(which may import the REPL) pass it in.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, ValidationError

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable
from rlm_wire.transport import HttpxTransport, Reply, Transport, TransportFactory

ModelT = TypeVar("ModelT", bound=BaseModel)

#: What a request body may be: a wire model (sent without its None fields) or raw JSON.
Body = BaseModel | bytes | None

#: Statuses a service answers without having done anything: safe to retry for any call.
_REFUSED_STATUSES = frozenset({429, 503})


class RetryClock(Protocol):
    """One call's retries: the pause before the next try, or None once the deadline is spent."""

    retries: int

    def next_pause(self, retry_after: str | None = None) -> float | None: ...


class RetrySchedule(Protocol):
    """What a client needs of a retry policy (`rlm_repl.RetryPolicy` is the one there is)."""

    @property
    def retryable_statuses(self) -> frozenset[int]: ...

    def start(self) -> RetryClock: ...


class _ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = "error"
    message: str = ""


class _ErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    error: _ErrorInfo


class ApiClient:
    """Base of a typed client of one JSON API, holding one token and one transport.

    `retry` is the retry policy (None: every call is tried once). `transport` builds the
    transport from the URL, token and headers (default `HttpxTransport`). Subclasses build
    their public methods on `_call` (a model back) and `_send` (the reply back).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float,
        retry: RetrySchedule | None,
        max_connections: int,
        headers: Mapping[str, str] | None = None,
        transport: TransportFactory = HttpxTransport,
    ) -> None:
        self._transport: Transport = transport(
            base_url, token, max_connections=max_connections, headers=headers
        )
        self._timeout_s = timeout_s
        self._retry = retry

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
        await self._transport.aclose()

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
        """The answer as `model`; an error body raises `ServiceResponseError`."""
        reply = await self._send(
            method,
            path,
            body=body,
            params=params,
            timeout_s=timeout_s,
            idempotent=idempotent,
            headers=headers,
        )
        try:
            return model.model_validate_json(reply.body)
        except ValidationError as exc:
            raise ServiceResponseError(
                reply.status, ErrorCode.UNEXPECTED_BODY, f"{method} {path}: {_first_error(exc)}"
            ) from exc

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
    ) -> Reply:
        """The reply; `ServiceUnreachable` if none came (retries spent), `ServiceResponseError`
        for a status of 400 and up unless `check` is off. `timeout_s` replaces the client's
        for this call."""
        content = (
            body.model_dump_json(exclude_none=True).encode()
            if isinstance(body, BaseModel)
            else body
        )
        target = f"{path}?{query_string(params)}" if params else path
        timeout = self._timeout_s if timeout_s is None else timeout_s
        clock: RetryClock | None = None
        sent = False  # whether any try may have reached the service
        while True:
            try:
                reply = await self._transport.request(
                    method, target, content, timeout_s=timeout, headers=headers
                )
            except ServiceUnreachable as exc:
                sent = sent or exc.sent
                if not idempotent or self._retry is None:
                    raise ServiceUnreachable(f"{method} {path}: {exc}", sent=sent) from exc
                clock = clock or self._retry.start()
                pause = clock.next_pause()
                if pause is None:
                    raise ServiceUnreachable(
                        f"{method} {path}: {exc} (gave up after {clock.retries} retries)",
                        sent=sent,
                    ) from exc
            else:
                if self._retry is None or not self._worth_retrying(reply.status, idempotent):
                    break
                clock = clock or self._retry.start()
                pause = clock.next_pause(reply.headers.get("retry-after"))
                if pause is None:
                    break
            await asyncio.sleep(pause)
        if check and reply.status >= 400:
            raise error_from_reply(reply)
        return reply

    def _worth_retrying(self, status: int, idempotent: bool) -> bool:
        assert self._retry is not None
        if status not in self._retry.retryable_statuses:
            return False
        return idempotent or status in _REFUSED_STATUSES


def error_from_reply(reply: Reply) -> ServiceResponseError:
    """An error answer `{"error": {"code", "message"}}` as a `ServiceResponseError`; any
    other body gives code `unexpected_body` with the body's start as the message."""
    try:
        error = _ErrorBody.model_validate_json(reply.body).error
    except ValidationError:
        text = reply.body[:200].decode("utf-8", "replace")
        return ServiceResponseError(
            reply.status, ErrorCode.UNEXPECTED_BODY, text or f"HTTP {reply.status}", reply.headers
        )
    return ServiceResponseError(reply.status, error.code, error.message, reply.headers)


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    return str(errors[0].get("msg", exc)) if errors else str(exc)


#: Query values `urlencode` leaves as they are (it quotes none of these characters).
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


def query_string(params: Mapping[str, Any]) -> str:
    """`urlencode(params)`, the same string, written directly for numbers and URL-safe
    words: `urlencode` quotes every name and value, which cost a long-poll more CPU than
    decoding its answer (docs/performance.md); anything else still goes through it."""
    parts = []
    for name, value in params.items():
        # A number's text is checked too: 1e+300 has a "+".
        text = str(value) if type(value) in (int, float) else value
        if isinstance(text, str) and _URL_SAFE.fullmatch(text) and _URL_SAFE.fullmatch(name):
            parts.append(f"{name}={text}")
        else:
            parts.append(urlencode({name: value}))
    return "&".join(parts)
