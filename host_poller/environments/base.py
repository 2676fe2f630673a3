"""The interface every execution environment of the RLM loop implements, and its registry.

An environment runs the model's code with the REPL functions (`llm_query` & co. reach the
broker with the session token in the spec) and keeps variables across executions.
Registered names: "local" and "command" (this package), "pyodide" and "remote" (the sandbox
runtime's).
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import JsonValue

from host_poller.environments.errors import UnknownEnvironmentError
from rlm_wire.runtime_models import Context, ExecutionResult, Limits

if TYPE_CHECKING:
    from host_poller.settings import HostSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvironmentSpec:
    """What one RLM session's environment needs to start."""

    broker_url: str
    """Where llm_query goes."""
    session_token: str
    """Broker session token of this RLM session."""
    depth: int
    """Depth of this RLM (root = 0); its calls go at depth + 1."""
    max_depth: int
    limits: Limits
    state: dict[str, JsonValue] | None
    """Initial shared state."""


class Environment(abc.ABC):
    """One REPL session for one RLM: start, load the context, execute code, read the state."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, spec: EnvironmentSpec) -> None:
        """Open the session; the REPL functions use `spec` to reach the broker."""

    @abc.abstractmethod
    async def load_context(self, context: Context, index: int = 0) -> None:
        """Bind `context_<index>` in the session (index 0 is also `context`); never inlined
        into code. Loading an index again replaces that context."""

    @abc.abstractmethod
    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        """Run `code`; its output, error, FINAL and state come back in the result."""

    @abc.abstractmethod
    async def get_state(self) -> dict[str, JsonValue]:
        """The current shared `state` dict."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """End the session and release its resources; safe to call twice."""


EnvironmentFactory = Callable[["HostSettings"], Environment]

_registry: dict[str, EnvironmentFactory] = {}

# The kinds this package provides and the module that registers each: a run's environment
# imports its own module only (a local run imported the other three and the sandbox
# runtime's package, ~16 ms under load, for nothing).
_OWN_KINDS = {
    "local": "host_poller.environments.local",
    "command": "host_poller.environments.command",
    "pyodide": "host_poller.environments.pyodide",
    "remote": "host_poller.environments.remote",
}
# Modules that register environments when imported; looked up on first use so that a
# missing optional one (e.g. the sandbox runtime) costs nothing.
_PROVIDER_MODULES = (*_OWN_KINDS.values(), "sandbox_runtime.environments")
_providers_loaded = False


def register_environment(name: str, factory: EnvironmentFactory) -> None:
    """Make `create_environment(name, ...)` build environments with `factory`."""
    _registry[name] = factory


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module_name in _PROVIDER_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            logger.debug("environment provider absent", extra={"provider_module": module_name})


def _factory(name: str) -> EnvironmentFactory | None:
    """`name`'s factory: its own module is imported first, every provider only for a name
    that none of this package's kinds is."""
    if name not in _registry and name in _OWN_KINDS:
        importlib.import_module(_OWN_KINDS[name])
    if name not in _registry:
        _load_providers()
    return _registry.get(name)


def registered_environments() -> list[str]:
    """Names that `create_environment` accepts."""
    _load_providers()
    return sorted(_registry)


def is_registered(name: str) -> bool:
    """Whether `create_environment(name, ...)` would find `name`'s kind."""
    return _factory(name) is not None


def create_environment(name: str, settings: HostSettings) -> Environment:
    """A new, not yet started environment of the registered kind `name`."""
    factory = _factory(name)
    if factory is None:
        raise UnknownEnvironmentError(name, registered_environments())
    return factory(settings)
