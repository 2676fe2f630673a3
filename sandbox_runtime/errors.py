"""Errors of the sandbox runtime.

SandboxError                  root of everything below
├── SandboxStartError         a sandbox process did not come up (or its snapshot failed)
├── SandboxCrashedError       the process died, or an operation was asked of a dead one
│   └── SandboxMemoryError    ... and it died of memory exhaustion
├── SandboxTimeoutError       an operation overran its time; `state_lost` if it was killed
├── SandboxProtocolError      the process broke the pipe protocol (it was killed)
├── SandboxGuestError         the guest refused a request (bad state, bad blob); `type`
└── SandboxBlobError          a hibernation blob is malformed or too large
"""

from __future__ import annotations


class SandboxError(Exception):
    """Root of the sandbox runtime's errors."""


class SandboxStartError(SandboxError):
    """A sandbox process failed to start or to report ready."""


class SandboxCrashedError(SandboxError):
    """The sandbox process is gone; its variables are lost."""

    state_lost = True


class SandboxMemoryError(SandboxCrashedError):
    """The sandbox process died of memory exhaustion."""


class SandboxTimeoutError(SandboxError):
    """An operation on a sandbox overran its time limit."""

    def __init__(self, message: str, *, state_lost: bool) -> None:
        super().__init__(message)
        self.state_lost = state_lost


class SandboxProtocolError(SandboxError):
    """The sandbox process sent something outside the protocol; it has been killed."""


class SandboxGuestError(SandboxError):
    """The guest inside the sandbox refused a request (the process is still usable)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


class SandboxBlobError(SandboxError):
    """A hibernation blob is malformed, of another format, or decompresses past the limit."""
