"""An async client for the broker's HTTP API, used by the host poller and the sandbox runtime.

One `BrokerClient` holds one token (admin, tenant or session) and one keep-alive connection
pool. Methods take and return the wire models of `rlm_wire.broker_models`; failures raise
`broker.errors.ClientError` subclasses. Connection errors are retried with jittered backoff
(stamina) only for calls that are safe to repeat (the plumbing is `rlm_wire.ApiClient`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from rlm_wire import broker_models as p
from rlm_wire.api_client import ApiClient
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable
from rlm_wire.run_info import RunInfo

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Extra seconds the HTTP read timeout allows beyond a long-poll's own wait.
_WAIT_SLACK_S = 10.0


class BrokerClient(ApiClient):
    """Typed access to one broker with one token.

    `timeout_s` bounds each request; long-polls (`wait=`) get `wait + 10 s` on top. `retries`
    applies to connection failures of idempotent calls (reads, `/pending`, answers: the
    broker drops duplicate answers), not to `/enqueue` (a retry could enqueue twice).
    """

    unreachable = ServiceUnreachable
    response_error = ServiceResponseError

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
        super().__init__(
            base_url,
            token,
            timeout_s=timeout_s,
            retries=retries,
            max_connections=max_connections,
            headers={"X-RLM-Poller": poller_id} if poller_id else None,
        )

    # --- tenants and sessions (admin / tenant tokens) ---------------------------------------

    async def create_tenant(self, name: str) -> p.TenantCreated:
        return await self._call("POST", "/tenants", p.TenantCreated, body=p.CreateTenant(name=name))

    async def create_session(
        self,
        *,
        ttl_s: int | None = None,
        metadata: RunInfo | Mapping[str, Any] | None = None,
        tenant_id: str | None = None,
    ) -> p.SessionCreated:
        """Open a session; `tenant_id` is for admin tokens, which must name the tenant."""
        info = RunInfo.model_validate(metadata) if isinstance(metadata, Mapping) else metadata
        body = p.CreateSession(ttl_s=ttl_s, metadata=info, tenant_id=tenant_id)
        return await self._call("POST", "/sessions", p.SessionCreated, body=body)

    async def delete_session(self, session_id: str, *, tenant_id: str | None = None) -> None:
        """Close a session; `tenant_id` is for admin tokens, which must name the tenant."""
        params = {"tenant_id": tenant_id} if tenant_id is not None else None
        await self._send("DELETE", f"/sessions/{session_id}", params=params)

    # --- sandbox side (session token) --------------------------------------------------------

    async def enqueue(
        self,
        request: p.LLMRequest,
        *,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> p.RequestResult:
        """Enqueue one request. With an `idempotency_key` (unique per call) a failed attempt
        is retried safely: the broker enqueues nothing twice. Without one, never retried."""
        return await self._long_poll(
            "POST",
            "/enqueue",
            p.RequestResult,
            body=request,
            wait_s=wait_s,
            idempotent=idempotency_key is not None,
            headers=_idempotency(idempotency_key),
        )

    async def enqueue_batch(
        self,
        requests: list[p.LLMRequest],
        *,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> p.BatchResults:
        """Enqueue a batch; `idempotency_key` as for `enqueue`."""
        body = p.EnqueueBatch(batch=requests)
        return await self._long_poll(
            "POST",
            "/enqueue",
            p.BatchResults,
            body=body,
            wait_s=wait_s,
            idempotent=idempotency_key is not None,
            headers=_idempotency(idempotency_key),
        )

    async def get_request(self, request_id: str, *, wait_s: float | None = None) -> p.RequestResult:
        return await self._long_poll(
            "GET", f"/requests/{request_id}", p.RequestResult, wait_s=wait_s
        )

    async def wait_result(
        self, result: p.RequestResult, *, wait_s: float = 25.0
    ) -> p.RequestResult:
        """Re-wait on a `pending` result until it is done or failed."""
        while result.status == "pending":
            result = await self.get_request(result.id, wait_s=wait_s)
        return result

    # --- host side (tenant / admin token) ----------------------------------------------------

    async def pending(self, *, max_items: int = 32, wait_s: float = 25.0) -> p.PendingBatch:
        return await self._long_poll(
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
        response = await self._send("GET", "/health", check=False)
        data: dict[str, Any] = response.json()
        return data

    # --- plumbing ----------------------------------------------------------------------------

    async def _long_poll(
        self,
        method: str,
        path: str,
        model: type[ModelT],
        *,
        wait_s: float | None,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> ModelT:
        """`_call` with the broker's `?wait=`: the HTTP timeout outlasts the wait."""
        if wait_s is not None:
            params = {**(params or {}), "wait": wait_s}
        timeout_s = self._timeout_s + (wait_s + _WAIT_SLACK_S if wait_s else 0.0)
        return await self._call(
            method,
            path,
            model,
            body=body,
            params=params,
            timeout_s=timeout_s,
            idempotent=idempotent,
            headers=headers,
        )


def _idempotency(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key is not None else None
