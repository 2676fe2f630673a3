"""The sandbox's REPL: `rlm_repl.Repl` over the pipe, running in a `__main__` module."""

from __future__ import annotations

import ast
import sys
import time
import types
from typing import Any

import rlm_repl

from .host import Host, PipeTransport

SLEEP_SLICE_S = 0.1


class Session:
    """One sandbox's REPL, and what hibernation needs on top of it.

    Code runs in the `__dict__` of a module registered as `__main__`, so that pickle finds the
    classes the cells define. `definitions` keeps the source of each top-level function and
    class of the cells (they are re-run on restore, since pickle keeps them by reference).
    """

    def __init__(self, host: Host, state_bytes: int) -> None:
        self.host = host
        self.module = types.ModuleType("__main__")
        sys.modules["__main__"] = self.module
        # The depth is the bridge's to enforce: the sandbox does not know its session's.
        self.repl = rlm_repl.Repl(
            PipeTransport(host),
            max_depth=None,
            state_max_bytes=state_bytes,
            namespace=self.module.__dict__,
        )
        # name -> source of its latest top-level def/class, in definition order.
        self.definitions: dict[str, str] = {}
        # index -> the context object loaded at that index (what `namespace.dump` may leave
        # out, by identity), and index -> the names a snapshot restored without its contexts
        # left for that index's context (filled when the context is bound again).
        self.contexts: dict[int, Any] = {}
        self.context_holes: dict[int, list[str]] = {}

    @property
    def ns(self) -> dict[str, Any]:
        return self.repl.namespace

    def record_definitions(self, code: str) -> None:
        """Note the top-level functions and classes a cell that ran defined."""
        for node in ast.parse(code).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.definitions.pop(node.name, None)
                self.definitions[node.name] = ast.unparse(node)

    def sleep(self, seconds: float) -> None:
        """time.sleep that waits without spinning and honours the timeout's interrupt."""
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.host.sleep(min(remaining, SLEEP_SLICE_S) * 1000):
                self.host.clear_interrupt()
                raise KeyboardInterrupt
