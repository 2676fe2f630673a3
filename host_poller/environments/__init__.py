"""Execution environments of the RLM loop: one interface, a registry of named kinds."""

from host_poller.environments.base import (
    Environment,
    EnvironmentFactory,
    EnvironmentSpec,
    create_environment,
    is_registered,
    register_environment,
    registered_environments,
)
from host_poller.environments.errors import (
    EnvironmentStateError,
    ExecutionEnvironmentError,
    UnknownEnvironmentError,
)

__all__ = [
    "Environment",
    "EnvironmentFactory",
    "EnvironmentSpec",
    "EnvironmentStateError",
    "ExecutionEnvironmentError",
    "UnknownEnvironmentError",
    "create_environment",
    "is_registered",
    "register_environment",
    "registered_environments",
]
