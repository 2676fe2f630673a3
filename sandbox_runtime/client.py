"""An async client for the sandbox runtime's HTTP API (`rlm sandbox`).

Used by the RLM loop's `pyodide` (sessions) and `remote` (stateless) environments. Methods take
and return the wire models of `sandbox_runtime.protocol`; failures raise
`sandbox_runtime.service.errors.RuntimeClientError` subclasses. Connection errors are retried
(jittered backoff) only for calls that are safe to repeat.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar

import httpx2
import pydantic_core
import stamina
from pydantic import BaseModel

from sandbox_runtime import protocol as p
from sandbox_runtime.service.errors import RuntimeResponseError, RuntimeUnreachable

ModelT = TypeVar("ModelT", bound=BaseModel)


class RuntimeClient:
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
        retries: int = 2,
        max_connections: int = 100,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx2.Timeout(timeout_s),
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._timeout_s = timeout_s
        self._default_execute_s = default_execute_s
        self._execute_slack_s = execute_slack_s
        self._retries = retries

    async def __aenter__(self) -> RuntimeClient:
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

    # --- sessions (sidecar placement) -------------------------------------------------------

    async def create_session(self, body: p.CreateSession) -> p.SessionCreated:
        """Start a session (a sandbox from the warm pool); its id addresses the calls below."""
        return await self._call(
            "POST", "/sessions", p.SessionCreated, content=_dump(body), idempotent=False
        )

    async def execute(
        self, session_id: str, code: str, *, timeout_s: float | None = None
    ) -> p.ExecutionResult:
        """Run `code` in the session; variables persist between calls."""
        body = p.ExecuteRequest(code=code, timeout_s=timeout_s)
        return await self._call(
            "POST",
            f"/sessions/{session_id}/execute",
            p.ExecutionResult,
            content=_dump(body),
            timeout_s=self._execution_timeout(timeout_s),
            idempotent=False,
        )

    async def load_context(
        self, session_id: str, context: str | list[Any] | dict[str, Any]
    ) -> None:
        """Bind `context` in the session's interpreter (a raw JSON body; tens of MB are fine)."""
        content = pydantic_core.to_json(context)
        timeout = self._timeout_s + len(content) / 10_000_000
        await self._checked(
            "PUT", f"/sessions/{session_id}/context", content=content, timeout_s=timeout
        )

    async def list_vars(self, session_id: str) -> list[p.VarInfo]:
        response = await self._call("GET", f"/sessions/{session_id}/vars", p.VarsResponse)
        return list(response.variables)

    async def delete_session(self, session_id: str) -> None:
        """End the session; unknown sessions are not an error (the call is idempotent)."""
        try:
            await self._checked("DELETE", f"/sessions/{session_id}")
        except RuntimeResponseError as exc:
            if exc.status != 404:
                raise

    # --- stateless execution (remote placement) ---------------------------------------------

    async def execute_stateless(self, body: p.StatelessExecuteRequest) -> p.StatelessExecuteResult:
        """Run code on any replica; variables travel in `snapshot` (request and response)."""
        return await self._call(
            "POST",
            "/execute",
            p.StatelessExecuteResult,
            content=_dump(body),
            timeout_s=self._execution_timeout(body.limits.timeout_s),
            idempotent=False,
        )

    # --- monitoring ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        response = await self._checked("GET", "/health")
        data: dict[str, Any] = response.json()
        return data

    # --- plumbing -----------------------------------------------------------------------------

    def _execution_timeout(self, timeout_s: float | None) -> float:
        return (timeout_s or self._default_execute_s) + self._execute_slack_s

    async def _call(
        self,
        method: str,
        path: str,
        model: type[ModelT],
        *,
        content: bytes | None = None,
        timeout_s: float | None = None,
        idempotent: bool = True,
    ) -> ModelT:
        response = await self._checked(
            method, path, content=content, timeout_s=timeout_s, idempotent=idempotent
        )
        return model.model_validate_json(response.content)

    async def _checked(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        timeout_s: float | None = None,
        idempotent: bool = True,
    ) -> httpx2.Response:
        response = await self._send(
            method, path, content, timeout_s or self._timeout_s, idempotent=idempotent
        )
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        timeout_s: float,
        *,
        idempotent: bool,
    ) -> httpx2.Response:
        headers = {"Content-Type": "application/json"} if content is not None else None
        attempts = self._retries + 1 if idempotent else 1
        try:
            async for attempt in stamina.retry_context(
                on=(httpx2.TransportError,), attempts=attempts, wait_initial=0.05, wait_max=2.0
            ):
                with attempt:
                    return await self._http.request(
                        method, path, content=content, headers=headers, timeout=timeout_s
                    )
        except httpx2.TransportError as exc:
            raise RuntimeUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _dump(body: BaseModel) -> bytes:
    return body.model_dump_json(exclude_none=True).encode()


def _error_from(response: httpx2.Response) -> RuntimeResponseError:
    try:
        error = p.ErrorBody.model_validate_json(response.content).error
        return RuntimeResponseError(
            response.status_code, error.get("code", "error"), error.get("message", "")
        )
    except ValueError:
        return RuntimeResponseError(
            response.status_code, "unexpected_body", response.text[:200] or response.reason_phrase
        )
