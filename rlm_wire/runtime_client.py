"""An async client for the sandbox runtime's HTTP API (`rlm sandbox`).

Used by the RLM loop's `pyodide` (sessions) and `remote` (stateless) environments. Methods take
and return the wire models of `rlm_wire.runtime_models`; failures raise `ServiceUnreachable` or
`ServiceResponseError`. Given a retry policy, calls are retried under it (the plumbing is
`rlm_wire.ApiClient`); creating a session and executing code are not safe to repeat, so
they are retried only when the runtime refused them with 429/503.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

from rlm_wire import runtime_models as p
from rlm_wire.api_client import ApiClient, RetrySchedule
from rlm_wire.errors import ServiceResponseError
from rlm_wire.transport import HttpxTransport, TransportFactory


class RuntimeClient(ApiClient):
    """Typed access to one sandbox runtime with its bearer token.

    `timeout_s` bounds ordinary requests. An execution's HTTP timeout is its own wall-clock
    limit (`timeout_s` of the call, else `default_execute_s`) plus `execute_slack_s`, so the
    runtime always answers (with a timeout error) before the client gives up.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        default_execute_s: float = 300.0,
        execute_slack_s: float = 30.0,
        retry: RetrySchedule | None = None,
        max_connections: int = 100,
        transport: TransportFactory = HttpxTransport,
    ) -> None:
        super().__init__(
            base_url,
            token,
            timeout_s=timeout_s,
            retry=retry,
            max_connections=max_connections,
            transport=transport,
        )
        self._default_execute_s = default_execute_s
        self._execute_slack_s = execute_slack_s

    # --- sessions (sidecar placement) -------------------------------------------------------

    async def create_session(self, body: p.CreateSession) -> p.SessionCreated:
        """Start a session (a sandbox from the warm pool); its id addresses the calls below."""
        return await self._call("POST", "/sessions", p.SessionCreated, body=body, idempotent=False)

    async def execute(
        self, session_id: str, code: str, *, timeout_s: float | None = None
    ) -> p.ExecutionResult:
        """Run `code` in the session; variables persist between calls."""
        body = p.ExecuteRequest(code=code, timeout_s=timeout_s)
        return await self._call(
            "POST",
            f"/sessions/{session_id}/execute",
            p.ExecutionResult,
            body=body,
            timeout_s=self._execution_timeout(timeout_s),
            idempotent=False,
        )

    async def load_context(self, session_id: str, context: p.Context) -> None:
        """Bind `context` in the session's interpreter (a raw JSON body; tens of MB are fine)."""
        content = pydantic_core.to_json(context)
        timeout = self._timeout_s + len(content) / 10_000_000
        path = f"/sessions/{session_id}/context"
        await self._send("PUT", path, body=content, timeout_s=timeout)

    async def list_vars(self, session_id: str) -> list[p.VarInfo]:
        response = await self._call("GET", f"/sessions/{session_id}/vars", p.VarsResponse)
        return list(response.variables)

    async def delete_session(self, session_id: str) -> None:
        """End the session; unknown sessions are not an error (the call is idempotent)."""
        try:
            await self._send("DELETE", f"/sessions/{session_id}")
        except ServiceResponseError as exc:
            if exc.status != 404:
                raise

    # --- stateless execution (remote placement) ---------------------------------------------

    async def execute_stateless(self, body: p.StatelessExecuteRequest) -> p.StatelessExecuteResult:
        """Run code on any replica; variables travel in `snapshot` (request and response)."""
        return await self._call(
            "POST",
            "/execute",
            p.StatelessExecuteResult,
            body=body,
            timeout_s=self._execution_timeout(body.limits.timeout_s),
            idempotent=False,
        )

    # --- monitoring ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        reply = await self._send("GET", "/health")
        data: dict[str, Any] = json.loads(reply.body)
        return data

    # --- plumbing -----------------------------------------------------------------------------

    def _execution_timeout(self, timeout_s: float | None) -> float:
        return (timeout_s or self._default_execute_s) + self._execute_slack_s
