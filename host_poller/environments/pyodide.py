"""The "pyodide" environment: a session on a sidecar `rlm sandbox` runtime (Pyodide in Deno).

The runtime holds one sandbox process per session; variables stay in it between executions.
The broker session token goes to the runtime, never into the sandbox. If the runtime reports
`state_lost` (its sandbox was killed), the context is loaded again so the next code finds it.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue

from host_poller.environments.base import Environment, EnvironmentSpec, register_environment
from host_poller.environments.errors import EnvironmentStateError, ExecutionEnvironmentError
from host_poller.settings import HostSettings
from sandbox_runtime.client import RuntimeClient
from sandbox_runtime.protocol import BrokerAccess, CreateSession, ExecutionResult
from sandbox_runtime.service.errors import RuntimeClientError


class SandboxRuntimeError(ExecutionEnvironmentError):
    """The sandbox runtime could not be reached, or refused a call."""


def runtime_client(settings: HostSettings) -> RuntimeClient:
    """A client of the runtime configured in `settings` (RLM_RUNTIME_URL, RLM_RUNTIME_TOKEN)."""
    if not settings.runtime_url:
        raise SandboxRuntimeError(
            "RLM_RUNTIME_URL is not set: the pyodide and remote environments need a running "
            "`rlm sandbox` runtime"
        )
    token = settings.runtime_token.get_secret_value() if settings.runtime_token else None
    return RuntimeClient(
        settings.runtime_url,
        token,
        timeout_s=settings.broker_timeout_s,
        default_execute_s=settings.execution_timeout_s,
    )


def broker_access(spec: EnvironmentSpec) -> BrokerAccess:
    return BrokerAccess(
        url=spec.broker_url, token=spec.session_token, depth=spec.depth, max_depth=spec.max_depth
    )


class PyodideEnvironment(Environment):
    """Runs code in a session of the sandbox runtime."""

    name = "pyodide"

    def __init__(self, settings: HostSettings) -> None:
        self._settings = settings
        self._client: RuntimeClient | None = None
        self._session_id: str | None = None
        self._timeout_s = settings.execution_timeout_s
        self._state: dict[str, JsonValue] = {}
        self._context: str | list[str] | dict[str, Any] | None = None

    async def start(self, spec: EnvironmentSpec) -> None:
        if self._client is not None:
            raise EnvironmentStateError("pyodide environment already started")
        client = runtime_client(self._settings)
        body = CreateSession(broker=broker_access(spec), limits=spec.limits, state=spec.state)
        try:
            created = await client.create_session(body)
        except RuntimeClientError as exc:
            await client.aclose()
            raise SandboxRuntimeError(f"could not open a sandbox session: {exc}") from exc
        self._client, self._session_id = client, created.session_id
        self._state = dict(spec.state or {})
        if spec.limits.timeout_s is not None:
            self._timeout_s = spec.limits.timeout_s

    def _started(self) -> tuple[RuntimeClient, str]:
        if self._client is None or self._session_id is None:
            raise EnvironmentStateError("pyodide environment is not started (or closed)")
        return self._client, self._session_id

    async def load_context(self, context: str | list[str] | dict[str, Any]) -> None:
        client, session_id = self._started()
        try:
            await client.load_context(session_id, context)
        except RuntimeClientError as exc:
            raise SandboxRuntimeError(f"could not load the context: {exc}") from exc
        self._context = context

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        client, session_id = self._started()
        try:
            result = await client.execute(session_id, code, timeout_s=timeout_s or self._timeout_s)
            if result.state_lost and self._context is not None:
                await client.load_context(session_id, self._context)
        except RuntimeClientError as exc:
            raise SandboxRuntimeError(f"execution failed in the runtime: {exc}") from exc
        if result.state is not None:
            self._state = dict(result.state)
        return result

    async def get_state(self) -> dict[str, JsonValue]:
        self._started()
        # The state changes only while code runs, and every execution returns it.
        return dict(self._state)

    async def aclose(self) -> None:
        client, session_id = self._client, self._session_id
        self._client = self._session_id = None
        if client is None:
            return
        try:
            if session_id is not None:
                await client.delete_session(session_id)
        except RuntimeClientError as exc:
            raise SandboxRuntimeError(f"could not end the sandbox session: {exc}") from exc
        finally:
            await client.aclose()


register_environment(PyodideEnvironment.name, PyodideEnvironment)
