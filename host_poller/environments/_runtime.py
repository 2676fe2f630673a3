"""What the "pyodide" and "remote" environments share: both run code on an `rlm sandbox` runtime.

`RuntimeEnvironment` holds the runtime client, the spec and the shared `state` between
`start()` and `aclose()`; the subclasses keep only how an execution reaches the runtime (a
session on one runtime, or a stateless call that carries the namespace).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pydantic import JsonValue

from host_poller.environments.base import Environment, EnvironmentSpec
from host_poller.environments.errors import EnvironmentStateError, ExecutionEnvironmentError
from host_poller.settings import HostSettings
from rlm_wire.errors import WireError
from rlm_wire.runtime_client import RuntimeClient
from rlm_wire.runtime_models import BrokerAccess, Context, ExecutionResult


class SandboxRuntimeError(ExecutionEnvironmentError):
    """The sandbox runtime could not be reached, or refused a call."""


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """The runtime client's errors as `SandboxRuntimeError("<doing>: <error>")`."""
    try:
        yield
    except WireError as exc:
        raise SandboxRuntimeError(f"{doing}: {exc}") from exc


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
        retry=settings.retry_policy(),
    )


def broker_access(spec: EnvironmentSpec) -> BrokerAccess:
    """How code in the sandbox reaches the broker: this RLM session's token and depth."""
    return BrokerAccess(
        url=spec.broker_url, token=spec.session_token, depth=spec.depth, max_depth=spec.max_depth
    )


class RuntimeEnvironment(Environment):
    """Base of the environments that run code on the sandbox runtime."""

    def __init__(self, settings: HostSettings) -> None:
        self._settings = settings
        self._client: RuntimeClient | None = None
        self._spec: EnvironmentSpec | None = None
        self._state: dict[str, JsonValue] = {}
        self._contexts: dict[int, Context] = {}
        """What was loaded, by index: loaded again when the sandbox's state is lost."""

    async def start(self, spec: EnvironmentSpec) -> None:
        if self._client is not None:
            raise EnvironmentStateError(f"{self.name} environment already started")
        client = runtime_client(self._settings)
        try:
            await self._open(client, spec)
        except BaseException:
            await client.aclose()
            raise
        self._client, self._spec = client, spec
        self._state = dict(spec.state or {})

    async def _open(self, client: RuntimeClient, spec: EnvironmentSpec) -> None:
        """What `start()` asks of the runtime before the environment counts as started."""

    async def _close(self, client: RuntimeClient) -> None:
        """What `aclose()` asks of the runtime before its client is closed."""

    def _started(self) -> tuple[RuntimeClient, EnvironmentSpec]:
        if self._client is None or self._spec is None:
            raise EnvironmentStateError(f"{self.name} environment is not started (or closed)")
        return self._client, self._spec

    def _timeout(self, timeout_s: float | None) -> float:
        """An execution's limit: the call's, else the spec's, else the settings'."""
        _, spec = self._started()
        return timeout_s or spec.limits.timeout_s or self._settings.execution_timeout_s

    def _keep_state(self, result: ExecutionResult) -> ExecutionResult:
        if result.state is not None:
            self._state = dict(result.state)
        return result

    async def get_state(self) -> dict[str, JsonValue]:
        self._started()
        # The state changes only while code runs, and every execution returns it.
        return dict(self._state)

    async def aclose(self) -> None:
        client, self._client, self._spec = self._client, None, None
        if client is None:
            return
        try:
            await self._close(client)
        finally:
            await client.aclose()
