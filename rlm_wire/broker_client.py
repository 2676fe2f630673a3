"""An async client for the broker's HTTP API, used by the host poller and the sandbox runtime.

One `BrokerClient` holds one token (admin, tenant or session) and one transport (httpx2, or
the lean `KeepAliveLink` on hot paths). Methods take and return the wire models of
`rlm_wire.broker_models`; failures raise `ServiceUnreachable` or `ServiceResponseError`.
Given a retry policy (`rlm_repl.RetryPolicy`), every call is retried under it (the plumbing
is `rlm_wire.ApiClient`):
`/enqueue` always carries an `Idempotency-Key`, so a retried enqueue re-attaches to the
request it already made instead of enqueuing (and paying for) it twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from rlm_wire import broker_models as p
from rlm_wire.api_client import ApiClient, RetrySchedule
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError
from rlm_wire.run_info import RunInfo
from rlm_wire.transport import HttpxTransport, TransportFactory

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Extra seconds the HTTP read timeout allows beyond a long-poll's own wait.
_WAIT_SLACK_S = 10.0


class BrokerClient(ApiClient):
    """Typed access to one broker with one token.

    `timeout_s` bounds each request; long-polls (`wait=`) get `wait + 10 s` on top. `retry`
    is the retry policy (`rlm_repl.RetryPolicy`; None, the default: every call tried once).
    Every call is safe to repeat: reads, `/pending` (a lost answer's leases lapse and the
    requests are delivered again; at once if a later call reports it, `pending(abandoned=)`),
    answers (the broker keeps the first) and `/enqueue`
    (keyed); creating tenants and sessions is retried only when refused with 429/503.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        retry: RetrySchedule | None = None,
        max_connections: int = 100,
        poller_id: str | None = None,
        transport: TransportFactory = HttpxTransport,
    ) -> None:
        super().__init__(
            base_url,
            token,
            timeout_s=timeout_s,
            retry=retry,
            max_connections=max_connections,
            headers={"X-RLM-Poller": poller_id} if poller_id else None,
            transport=transport,
        )

    # --- tenants and sessions (admin / tenant tokens) ---------------------------------------

    async def create_tenant(self, name: str) -> p.TenantCreated:
        body = p.CreateTenant(name=name)
        return await self._call("POST", "/tenants", p.TenantCreated, body=body, idempotent=False)

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
        return await self._call("POST", "/sessions", p.SessionCreated, body=body, idempotent=False)

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
        """Enqueue one request under `idempotency_key` (unique per call; a fresh one by
        default): a retried attempt finds the request already made, never a second one."""
        return await self._long_poll(
            "POST",
            "/enqueue",
            p.RequestResult,
            body=request,
            wait_s=wait_s,
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

    async def pending(
        self,
        *,
        max_items: int = 32,
        wait_s: float = 25.0,
        poll_id: str | None = None,
        abandoned: Sequence[str] = (),
    ) -> p.PendingBatch:
        """Lease up to `max_items` requests. `poll_id` names this long-poll (8-64 URL-safe
        characters, fresh per call); `abandoned` lists earlier ones whose answer never
        arrived whole, so the broker hands back at once what they still hold."""
        params: dict[str, Any] = {"max": max_items}
        if poll_id is not None:
            params["poll"] = poll_id
        if abandoned:
            params["abandoned"] = ",".join(abandoned)
        batch = await self._long_poll(
            "GET", "/pending", p.PendingBatch, params=params, wait_s=wait_s
        )
        if len(batch.requests) > max_items:
            # The poller's concurrency bound rests on it: never more held than it asked for.
            raise ServiceResponseError(
                200,
                ErrorCode.UNEXPECTED_BODY,
                f"GET /pending: {len(batch.requests)} requests for at most {max_items}",
            )
        return batch

    async def respond(self, answer: p.Answer) -> p.RespondResult:
        return await self._call("POST", "/respond", p.RespondResult, body=answer)

    async def respond_batch(self, answers: list[p.Answer]) -> p.RespondResults:
        body = p.AnswerBatch(responses=answers)
        return await self._call("POST", "/respond", p.RespondResults, body=body)

    async def extend_leases(self, ids: list[str]) -> p.LeaseResults:
        body = p.ExtendLeases(ids=ids)
        return await self._call("POST", "/leases/extend", p.LeaseResults, body=body)

    async def release_leases(
        self, ids: list[str], *, polls: Sequence[str] = ()
    ) -> p.ReleaseResults:
        """Hand back requests this poller will not answer, and what its lost long-polls
        `polls` still hold (POST /leases/release)."""
        body = p.ReleaseLeases(ids=ids, polls=list(polls))
        return await self._call("POST", "/leases/release", p.ReleaseResults, body=body)

    # --- monitoring --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """`/health` as a dict; a 503 (degraded) is returned, not raised."""
        reply = await self._send("GET", "/health", check=False)
        data: dict[str, Any] = json.loads(reply.body)
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
            headers=headers,
        )


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key if key is not None else uuid.uuid4().hex}
