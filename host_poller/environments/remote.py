"""The "remote" environment: stateless executions on a scaled `rlm sandbox` runtime.

Nothing stays on the runtime between calls: each `POST /execute` carries the namespace blob
the previous one returned (and the `state`), so any replica can serve any call. The context
is sent once, with the first execution after `load_context`, and then travels in the blob.
"""

from __future__ import annotations

from host_poller.environments._runtime import (
    Context,
    RuntimeEnvironment,
    broker_access,
    translated,
)
from host_poller.environments.base import register_environment
from host_poller.settings import HostSettings
from rlm_wire.runtime_client import RuntimeClient
from rlm_wire.runtime_models import ExecutionResult, StatelessExecuteRequest


class RemoteEnvironment(RuntimeEnvironment):
    """Runs each execution on any runtime replica, carrying the namespace in the request."""

    name = "remote"

    def __init__(self, settings: HostSettings) -> None:
        super().__init__(settings)
        self._snapshot: str | None = None
        self._context_sent = False

    async def _close(self, client: RuntimeClient) -> None:
        self._snapshot = None

    async def load_context(self, context: Context) -> None:
        self._started()
        self._context = context
        self._context_sent = False

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        client, spec = self._started()
        body = StatelessExecuteRequest(
            code=code,
            snapshot=self._snapshot,
            context=None if self._context_sent else self._context,
            broker=broker_access(spec),
            limits=spec.limits.model_copy(update={"timeout_s": self._timeout(timeout_s)}),
            state=self._state,
        )
        with translated("execution failed in the runtime"):
            response = await client.execute_stateless(body)
        # On `state_lost` the runtime returned our previous blob: send the context again.
        self._context_sent = not response.result.state_lost
        self._snapshot = response.snapshot or self._snapshot
        return self._keep_state(response.result)


register_environment(RemoteEnvironment.name, RemoteEnvironment)
