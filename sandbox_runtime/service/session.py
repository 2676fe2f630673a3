"""One session: a sandbox process of its own (or its hibernation blob), and a lock.

Executions of a session run one at a time (the lock); the process is never shared with another
session. A session is live (a process), or hibernated (a blob in the store, no process). If the
process dies (crash, or killed after a timeout it ignored), the next call replaces it: from the
last hibernation blob if there is one, else fresh (the setup code and the last known `state`
are applied again); either way the result says `state_lost`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from pydantic import JsonValue

from sandbox_runtime.service.bridge import BrokerBridge
from sandbox_runtime.service.settings import SessionLimits
from sandbox_runtime.worker import SandboxProcess


@dataclass(eq=False)
class Session:
    """The service's record of one session; fields are changed only under `lock`."""

    id: str
    limits: SessionLimits
    bridge: BrokerBridge
    setup_code: str | None
    state: dict[str, JsonValue] | None
    process: SandboxProcess | None
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: A blob of this session is in the store (its last hibernation).
    has_blob: bool = False
    #: The process died since the last execution; the next result reports state_lost.
    state_lost: bool = False
    closed: bool = False
    executions: int = 0

    @property
    def hibernated(self) -> bool:
        return self.process is None and not self.closed

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_for(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.last_used
