"""An async client for the broker's HTTP API, used by the host poller and the sandbox runtime.

One `BrokerClient` holds one token (admin, tenant or session) and one keep-alive connection
pool. Methods take and return the wire models of `broker.protocol`; failures raise
`broker.errors.ClientError` subclasses. Connection errors are retried with jittered backoff
(stamina) only for calls that are safe to repeat.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx2
import stamina
from pydantic import BaseModel

from broker import protocol as p
from broker.errors import BrokerResponseError, BrokerUnreachable

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Extra seconds the HTTP read timeout allows beyond a long-poll's own wait.
_WAIT_SLACK_S = 10.0


class BrokerClient:
    """Typed access to one broker with one token.

    `timeout_s` bounds each request; long-polls (`wait=`) get `wait + 10 s` on top. `retries`
    applies to connection failures of idempotent calls (reads, `/pending`, answers: the
    broker drops duplicate answers), not to `/enqueue` (a retry could enqueue twice).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_connections: int = 100,
        poller_id: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if poller_id:
            headers["X-RLM-Poller"] = poller_id
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx2.Timeout(timeout_s),
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._timeout_s = timeout_s
        self._retries = retries

    async def __aenter__(self) -> BrokerClient:
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

    # --- tenants and sessions (admin / tenant tokens) ---------------------------------------

    async def create_tenant(self, name: str) -> p.TenantCreated:
        return await self._call("POST", "/tenants", p.TenantCreated, body=p.CreateTenant(name=name))

    async def create_session(
        self,
        *,
        ttl_s: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        tenant_id: str | None = None,
    ) -> p.SessionCreated:
        """Open a session; `tenant_id` is for admin tokens, which must name the tenant."""
        body = p.CreateSession(
            ttl_s=ttl_s, metadata=dict(metadata) if metadata else None, tenant_id=tenant_id
        )
        return await self._call("POST", "/sessions", p.SessionCreated, body=body)

    async def delete_session(self, session_id: str) -> None:
        response = await self._send(
            "DELETE", f"/sessions/{session_id}", None, None, None, idempotent=True
        )
        if response.status_code >= 400:
            raise _error_from(response)

    # --- sandbox side (session token) --------------------------------------------------------

    async def enqueue(
        self, request: p.LLMRequest, *, wait_s: float | None = None
    ) -> p.RequestResult:
        return await self._call(
            "POST", "/enqueue", p.RequestResult, body=request, wait_s=wait_s, idempotent=False
        )

    async def enqueue_batch(
        self, requests: list[p.LLMRequest], *, wait_s: float | None = None
    ) -> p.BatchResults:
        body = p.EnqueueBatch(batch=requests)
        return await self._call(
            "POST", "/enqueue", p.BatchResults, body=body, wait_s=wait_s, idempotent=False
        )

    async def get_request(self, request_id: str, *, wait_s: float | None = None) -> p.RequestResult:
        return await self._call("GET", f"/requests/{request_id}", p.RequestResult, wait_s=wait_s)

    async def wait_result(
        self, result: p.RequestResult, *, wait_s: float = 25.0
    ) -> p.RequestResult:
        """Re-wait on a `pending` result until it is done or failed."""
        while result.status == "pending":
            result = await self.get_request(result.id, wait_s=wait_s)
        return result

    # --- host side (tenant / admin token) ----------------------------------------------------

    async def pending(self, *, max_items: int = 32, wait_s: float = 25.0) -> p.PendingBatch:
        return await self._call(
            "GET", "/pending", p.PendingBatch, params={"max": max_items}, wait_s=wait_s
        )

    async def respond(self, answer: p.Answer) -> p.RespondResult:
        return await self._call("POST", "/respond", p.RespondResult, body=answer)

    async def respond_batch(self, answers: list[p.Answer]) -> p.RespondResults:
        body = p.AnswerBatch(responses=answers)
        return await self._call("POST", "/respond", p.RespondResults, body=body)

    async def extend_leases(self, ids: list[str]) -> p.LeaseResults:
        body = p.ExtendLeases(ids=ids)
        return await self._call("POST", "/leases/extend", p.LeaseResults, body=body)

    # --- monitoring --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """`/health` as a dict; a 503 (degraded) is returned, not raised."""
        response = await self._send("GET", "/health", None, None, None, idempotent=True)
        data: dict[str, Any] = response.json()
        return data

    # --- plumbing ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        model: type[ModelT],
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        wait_s: float | None = None,
        idempotent: bool = True,
    ) -> ModelT:
        if wait_s is not None:
            params = {**(params or {}), "wait": wait_s}
        response = await self._send(method, path, body, params, wait_s, idempotent=idempotent)
        if response.status_code >= 400:
            raise _error_from(response)
        return model.model_validate_json(response.content)

    async def _send(
        self,
        method: str,
        path: str,
        body: BaseModel | None,
        params: dict[str, Any] | None,
        wait_s: float | None,
        *,
        idempotent: bool,
    ) -> httpx2.Response:
        timeout = self._timeout_s + (wait_s + _WAIT_SLACK_S if wait_s else 0.0)
        content = body.model_dump_json(exclude_none=True) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        send = functools.partial(
            self._http.request,
            method,
            path,
            content=content,
            params=params,
            headers=headers,
            timeout=timeout,
        )
        try:
            return await send()  # the common case: no retry machinery on the hot path
        except httpx2.TransportError as exc:
            if not idempotent or self._retries == 0:
                raise BrokerUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            async for attempt in stamina.retry_context(
                on=httpx2.TransportError, attempts=self._retries, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    return await send()
        except httpx2.TransportError as exc:
            raise BrokerUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _error_from(response: httpx2.Response) -> BrokerResponseError:
    try:
        error = p.ErrorBody.model_validate_json(response.content).error
        return BrokerResponseError(response.status_code, error.code, error.message)
    except ValueError:
        return BrokerResponseError(
            response.status_code, "unexpected_body", response.text[:200] or response.reason_phrase
        )
