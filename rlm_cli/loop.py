"""The event loop of every command that serves or polls: uvloop where it is installed.

uvloop (installed with `uvicorn[standard]`) cuts the per-request CPU of the asyncio
machinery by roughly half (docs/performance.md); the broker's uvicorn and the sandbox
runtime already run on it. Commands that serve or poll (`rlm poller`, `rlm up`, `rlm ask`,
`rlm serve`, `rlm view`, `rlm host`) start their loop here, so they all run on the same one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` on uvloop if it can be imported, else on the stdlib loop."""
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build: the stdlib loop then
        return asyncio.run(coro)
    return uvloop.run(coro)
