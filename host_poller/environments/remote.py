"""The "remote" environment: stateless executions on a scaled `rlm sandbox` runtime.

Nothing stays on the runtime between calls: each `POST /execute` carries the namespace blob
the previous one returned (and the `state`), so any replica can serve any call. The context
is sent once, with the first execution after `load_context`, and then travels in the blob.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue

from host_poller.environments.base import Environment, EnvironmentSpec, register_environment
from host_poller.environments.errors import EnvironmentStateError
from host_poller.environments.pyodide import SandboxRuntimeError, broker_access, runtime_client
from host_poller.settings import HostSettings
from sandbox_runtime.client import RuntimeClient
from sandbox_runtime.protocol import ExecutionResult, StatelessExecuteRequest
from sandbox_runtime.service.errors import RuntimeClientError


class RemoteEnvironment(Environment):
    """Runs each execution on any runtime replica, carrying the namespace in the request."""

    name = "remote"

    def __init__(self, settings: HostSettings) -> None:
        self._settings = settings
        self._client: RuntimeClient | None = None
        self._spec: EnvironmentSpec | None = None
        self._snapshot: str | None = None
        self._state: dict[str, JsonValue] = {}
        self._context: str | list[str] | dict[str, Any] | None = None
        self._context_sent = False

    async def start(self, spec: EnvironmentSpec) -> None:
        if self._client is not None:
            raise EnvironmentStateError("remote environment already started")
        self._client = runtime_client(self._settings)
        self._spec = spec
        self._state = dict(spec.state or {})

    def _started(self) -> tuple[RuntimeClient, EnvironmentSpec]:
        if self._client is None or self._spec is None:
            raise EnvironmentStateError("remote environment is not started (or closed)")
        return self._client, self._spec

    async def load_context(self, context: str | list[str] | dict[str, Any]) -> None:
        self._started()
        self._context = context
        self._context_sent = False

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        client, spec = self._started()
        limits = spec.limits
        timeout = timeout_s or limits.timeout_s or self._settings.execution_timeout_s
        body = StatelessExecuteRequest(
            code=code,
            snapshot=self._snapshot,
            context=None if self._context_sent else self._context,
            broker=broker_access(spec),
            limits=limits.model_copy(update={"timeout_s": timeout}),
            state=self._state,
        )
        try:
            response = await client.execute_stateless(body)
        except RuntimeClientError as exc:
            raise SandboxRuntimeError(f"execution failed in the runtime: {exc}") from exc
        result = response.result
        if result.state_lost:
            # The runtime returned our previous blob: send the context again with the next call.
            self._context_sent = False
        else:
            self._context_sent = True
        self._snapshot = response.snapshot or self._snapshot
        if result.state is not None:
            self._state = dict(result.state)
        return result

    async def get_state(self) -> dict[str, JsonValue]:
        self._started()
        return dict(self._state)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._spec = None
        self._snapshot = None
        if client is not None:
            await client.aclose()


register_environment(RemoteEnvironment.name, RemoteEnvironment)
