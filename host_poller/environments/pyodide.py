"""The "pyodide" environment: a session on a sidecar `rlm sandbox` runtime (Pyodide in Deno).

The runtime holds one sandbox process per session; variables stay in it between executions.
The broker session token goes to the runtime, never into the sandbox. If the runtime reports
`state_lost` (its sandbox was killed), the context is loaded again so the next code finds it.
"""

from __future__ import annotations

from host_poller.environments._runtime import (
    RuntimeEnvironment,
    SandboxRuntimeError,
    broker_access,
    runtime_client,
    translated,
)
from host_poller.environments.base import EnvironmentSpec, register_environment
from host_poller.environments.errors import EnvironmentStateError
from host_poller.settings import HostSettings
from rlm_wire.runtime_client import RuntimeClient
from rlm_wire.runtime_models import Context, CreateSession, ExecutionResult

__all__ = ["PyodideEnvironment", "SandboxRuntimeError", "broker_access", "runtime_client"]


class PyodideEnvironment(RuntimeEnvironment):
    """Runs code in a session of the sandbox runtime."""

    name = "pyodide"

    def __init__(self, settings: HostSettings) -> None:
        super().__init__(settings)
        self._session_id: str | None = None

    async def _open(self, client: RuntimeClient, spec: EnvironmentSpec) -> None:
        body = CreateSession(broker=broker_access(spec), limits=spec.limits, state=spec.state)
        with translated("could not open a sandbox session"):
            self._session_id = (await client.create_session(body)).session_id

    async def _close(self, client: RuntimeClient) -> None:
        session_id, self._session_id = self._session_id, None
        if session_id is not None:
            with translated("could not end the sandbox session"):
                await client.delete_session(session_id)

    def _session(self) -> tuple[RuntimeClient, str]:
        client, _ = self._started()
        if self._session_id is None:
            raise EnvironmentStateError("pyodide environment is not started (or closed)")
        return client, self._session_id

    async def load_context(self, context: Context, index: int = 0) -> None:
        client, session_id = self._session()
        with translated("could not load the context"):
            await client.load_context(session_id, context, index)
        self._contexts[index] = context

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        client, session_id = self._session()
        with translated("execution failed in the runtime"):
            result = await client.execute(session_id, code, timeout_s=self._timeout(timeout_s))
            if result.state_lost:
                for index, context in self._contexts.items():
                    await client.load_context(session_id, context, index)
        return self._keep_state(result)


register_environment(PyodideEnvironment.name, PyodideEnvironment)
