"""The JavaScript host's API as seen from the guest (a JsProxy in Pyodide, a fake in tests)."""

from __future__ import annotations

from typing import Any, Protocol


class Host(Protocol):
    """Functions that `host.mjs` hands to `runtime.install`."""

    def call(self, header_json: str) -> str:
        """Send a request frame to the supervisor and block until its reply; returns its JSON."""

    def reply(self, header_json: str, payload: Any) -> None:
        """Send the reply frame of the request being served (payload: bytes or None)."""

    def memory_bytes(self) -> int:
        """Current size of the WebAssembly memory."""

    def sleep(self, ms: float) -> bool:
        """Block up to `ms` milliseconds without spinning; True when an interrupt is pending."""

    def clear_interrupt(self) -> None:
        """Forget a pending interrupt (after raising KeyboardInterrupt for it ourselves)."""
