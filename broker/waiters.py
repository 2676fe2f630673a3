"""In-process rendezvous points, so that waiting costs a future, not a Redis connection.

`Waiters`: `/enqueue` and `/requests/{id}` register a future per request id *before* the
request is published; the reply listener resolves it with the result JSON.
`WorkSignals`: a waiting `/pending` sleeps on its tenant's event (or, for admin, the
all-tenants event); the listener sets them when Redis announces new work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


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
    """Wakes waiting `/pending` calls when their tenant (or any tenant) has new work."""

    def __init__(self) -> None:
        self._tenant_events: dict[str, asyncio.Event] = {}
        self._any = asyncio.Event()
        #: tenants announced since an admin drain last looked; admin draining serves these first
        self.ready: set[str] = set()

    def event_for(self, tenant_id: str | None) -> asyncio.Event:
        """The event to wait on; take it *before* reading the queue so no wake-up is missed."""
        if tenant_id is None:
            return self._any
        event = self._tenant_events.get(tenant_id)
        if event is None:
            event = self._tenant_events[tenant_id] = asyncio.Event()
        return event

    def notify(self, tenant_ids: Iterable[str]) -> None:
        for tenant_id in tenant_ids:
            self.ready.add(tenant_id)
            event = self._tenant_events.pop(tenant_id, None)
            if event is not None:
                event.set()
        self._any.set()
        self._any = asyncio.Event()

    def notify_all(self) -> None:
        """After a reconnect: wake everyone, since announcements may have been lost."""
        self.notify(list(self._tenant_events))
