"""Errors of the execution environments.

    ExecutionEnvironmentError       root
    ├── UnknownEnvironmentError     no environment registered under that name
    └── EnvironmentStateError       used before `start()`, or after `aclose()`

A failure of the model's code is not an error here: it is reported in
`ExecutionResult.error`. Environments that reach a service translate its failures into a
subclass of the root (`raise ... from exc`).
"""

from __future__ import annotations


class ExecutionEnvironmentError(Exception):
    """Root of the environments' exceptions."""


class UnknownEnvironmentError(ExecutionEnvironmentError, LookupError):
    """No environment of that name is registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown environment {name!r}; registered: {', '.join(known) or 'none'}")
        self.name = name
        self.known = known


class EnvironmentStateError(ExecutionEnvironmentError, RuntimeError):
    """The environment is not started, or already closed."""
