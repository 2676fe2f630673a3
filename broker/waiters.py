"""In-process rendezvous points, so that waiting costs a future, not a Redis connection.

`Waiters`: `/enqueue` and `/requests/{id}` register a future per request id *before* the
request is published; the reply listener resolves it with the result JSON.
`WorkSignals`: a waiting `/pending` sleeps on its tenant's event (or, for admin, the
all-tenants event); the listener sets them when Redis announces new work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Waiters:
    """Futures of result JSON (bytes), keyed by request id; several may wait for one id."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[bytes]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._futures.values())

    def register(self, request_id: str) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(request_id, []).append(future)
        return future

    def discard(self, request_id: str, future: asyncio.Future[bytes]) -> None:
        futures = self._futures.get(request_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._futures[request_id]

    def resolve(self, request_id: str, result: bytes) -> None:
        for future in self._futures.pop(request_id, ()):
            if not future.done():
                future.set_result(result)

    def ids(self) -> list[str]:
        return list(self._futures)


class WorkSignals:
    """Wakes waiting `/pending` calls when new work arrives, one waiter per new request.

    Waking every long-poll of a tenant for each request would have all but one of them
    claim nothing (a wasted Redis script per extra poller). So a tenant's waiters queue up,
    an announcement of n requests wakes n of them, and a waiter that was woken but leaves
    without claiming passes its wake-up on (`leave`). Admin long-polls (all tenants) wait
    on one shared event instead; they are few.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._any = asyncio.Event()
        #: tenants announced since an admin drain last looked; admin draining serves these first
        self.ready: set[str] = set()

    def join(self, tenant_id: str | None) -> asyncio.Future[None]:
        """A future that is woken by new work; take it *before* reading the queue."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if tenant_id is None:
            any_event = self._any

            async def on_any() -> None:
                await any_event.wait()

            def wake(_: object) -> None:
                if not future.done():
                    future.set_result(None)

            task = asyncio.ensure_future(on_any())
            task.add_done_callback(wake)
            future.add_done_callback(lambda _: task.cancel())
        else:
            self._waiting.setdefault(tenant_id, deque()).append(future)
        return future

    def leave(self, tenant_id: str | None, future: asyncio.Future[None], *, used: bool) -> None:
        """Stop waiting; a wake-up received but not `used` goes to the next waiter."""
        if tenant_id is None:
            future.cancel()
            return
        if future.done():
            if not used and not future.cancelled():
                self._wake(tenant_id, 1)
            return
        future.cancel()
        waiting = self._waiting.get(tenant_id)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self._waiting[tenant_id]

    def notify(self, tenant_id: str, count: int = 1) -> None:
        self.ready.add(tenant_id)
        self._wake(tenant_id, count)
        self._any.set()
        self._any = asyncio.Event()

    def notify_all(self) -> None:
        """After a reconnect: wake everyone, since announcements may have been lost."""
        for tenant_id in list(self._waiting):
            self._wake(tenant_id, len(self._waiting[tenant_id]))
        self._any.set()
        self._any = asyncio.Event()

    def _wake(self, tenant_id: str, count: int) -> None:
        waiting = self._waiting.get(tenant_id)
        while waiting and count > 0:
            future = waiting.popleft()
            if not future.done():
                future.set_result(None)
                count -= 1
        if waiting is not None and not waiting:
            del self._waiting[tenant_id]
