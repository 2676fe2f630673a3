"""An async client for the sandbox runtime's HTTP API (`rlm sandbox`).

Used by the RLM loop's `pyodide` (sessions) and `remote` (stateless) environments. Methods take
and return the wire models of `rlm_wire.runtime_models`; failures raise `ServiceUnreachable` or
`ServiceResponseError`. Given a retry policy, calls are retried under it (the plumbing is
`rlm_wire.ApiClient`); creating a session and executing code are not safe to repeat, so
they are retried only when the runtime refused them with 429/503.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pydantic_core

from rlm_wire import runtime_models as p
from rlm_wire.api_client import ApiClient, RetrySchedule, error_from_reply
from rlm_wire.codes import ErrorCode
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

    async def load_context(self, session_id: str, context: p.Context, index: int = 0) -> None:
        """Bind `context_<index>` in the session's interpreter (index 0 is also `context`; a
        raw JSON body; tens of MB are fine)."""
        content = pydantic_core.to_json(context)
        timeout = self._timeout_s + len(content) / 10_000_000
        path = f"/sessions/{session_id}/context?index={index}"
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

    async def execute_with_contexts(
        self, body: p.StatelessExecuteRequest, contents: Mapping[str, bytes]
    ) -> p.StatelessExecuteResult:
        """`execute_stateless` for a body whose `contexts` reference hashes of `contents`
        (sha256 -> the bytes uploaded under it): a replica that holds one of them no longer
        (never had it, or evicted it) answers 409 `context_unknown` before running anything,
        so they are uploaded again and the call is tried once more."""
        try:
            return await self.execute_stateless(body)
        except ServiceResponseError as exc:
            if exc.status != 409 or exc.code != ErrorCode.CONTEXT_UNKNOWN:
                raise
        # A miss is rare (eviction, or a replica new to this run): upload only what the
        # replica lacks. Every HEAD comes first: it marks a held context recently used, so
        # the uploads that follow evict others before it.
        names = dict.fromkeys(ref.sha256 for ref in body.contexts or ())
        missing = [name for name in names if not await self.has_context(name)]
        for name in missing:
            await self.put_context(name, contents[name])
        return await self.execute_stateless(body)

    # --- the content-addressed context cache ------------------------------------------------

    async def put_context(self, sha256: str, content: bytes) -> None:
        """Upload a context under the sha256 of `content` (`context_content` makes both); safe
        to repeat, so it is retried like a read."""
        timeout = self._timeout_s + len(content) / 10_000_000
        await self._send("PUT", f"/contexts/{sha256}", body=content, timeout_s=timeout)

    async def has_context(self, sha256: str) -> bool:
        """Whether the replica that answers holds the context of this hash (a yes marks it
        recently used there)."""
        reply = await self._send("HEAD", f"/contexts/{sha256}", check=False)
        if reply.status not in (200, 404):
            raise error_from_reply(reply)
        return reply.status == 200

    # --- monitoring ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        reply = await self._send("GET", "/health")
        data: dict[str, Any] = json.loads(reply.body)
        return data

    # --- plumbing -----------------------------------------------------------------------------

    def _execution_timeout(self, timeout_s: float | None) -> float:
        return (timeout_s or self._default_execute_s) + self._execute_slack_s


def context_content(context: p.Context) -> tuple[bytes, str]:
    """A context's upload body (compact JSON) and its name in the runtime's cache (the
    sha256 of those bytes). Tens of MB take tens of milliseconds: call it in a thread."""
    content = pydantic_core.to_json(context)
    return content, hashlib.sha256(content).hexdigest()
