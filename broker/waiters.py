"""In-process rendezvous points, so that waiting costs a future, not a Redis connection.

`Waiters`: `/enqueue` and `/requests/{id}` register a future per request id *before* the
request is published; the reply listener resolves it with the result JSON.
`WorkSignals`: new work announced (by Redis through the listener, or by an enqueue here) wakes
the long-polls parked for it (`broker.parking`). It also counts the announcements, so that a
long-poll can tell that nothing was announced since a claim that drained the queue, and wait
without claiming (no empty claim script).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from broker.parking import Parking

#: Tenants whose announcements one replica tracks before it forgets them all (and, to stay
#: safe, every drained mark with them): bounds memory whatever the number of tenants.
_MAX_TRACKED = 100_000


@dataclass(frozen=True)
class _Drained:
    clock: int
    """the announcement clock when the claim that drained the queue began"""
    at: float
    """when it began (monotonic)"""


class Waiters:
    """Futures of result JSON (bytes), keyed by request id; several may wait for one id.

    A future is its waiter's own: its wait may settle it with None ("no result yet") when it
    times out or its client hangs up (`Hold.wait_one`)."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[bytes | None]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._futures.values())

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._futures

    def register(self, request_id: str) -> asyncio.Future[bytes | None]:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(request_id, []).append(future)
        return future

    def discard(self, request_id: str, future: asyncio.Future[bytes | None]) -> None:
        futures = self._futures.get(request_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._futures[request_id]

    def resolve(self, request_id: str, result: bytes) -> int:
        """Give `result` to every waiter of `request_id`; how many were still waiting."""
        resolved = 0
        for future in self._futures.pop(request_id, ()):
            if not future.done():
                future.set_result(result)
                resolved += 1
        return resolved

    def ids(self) -> list[str]:
        return list(self._futures)


class WorkSignals:
    """Announcements of new work on this replica: they wake its parked long-polls
    (`broker.parking`, which decides whom) and tick a clock.

    A claim takes `mark()` before it starts and, when it leaves its queue empty, records
    `drained(scope, mark, now)`; a long-poll that starts within `recheck_s` of that, with
    nothing announced for its scope since the mark, needs no claim (`quiet_until`). Work
    that arrives unannounced (an expired lease to deliver again) is still found by the
    periodic re-claim, at most `recheck_s` after the last claim; after a lost subscription
    `notify_all` forgets every mark.
    """

    def __init__(self, recheck_s: float, parking: Parking) -> None:
        self._parking = parking
        #: tenants announced since an admin drain last looked; admin draining serves these first
        self.ready: set[str] = set()
        self._recheck_s = recheck_s
        self._clock = 0
        self._announced: dict[str, int] = {}  # tenant -> clock of its last announcement
        self._announced_any = 0
        self._reset = 0  # clock of the last `notify_all`: marks before it are void
        self._drained: dict[str | None, _Drained] = {}  # scope (None: admin) -> last drain

    def mark(self) -> int:
        """The announcement clock; take it before a claim starts."""
        return self._clock

    def drained(self, scope: str | None, mark: int, started_at: float) -> None:
        """A claim for `scope` (a tenant, None: all) that began at `mark` and monotonic
        `started_at` left its queue empty."""
        if len(self._drained) >= _MAX_TRACKED and scope not in self._drained:
            self._drained.clear()
        self._drained[scope] = _Drained(mark, started_at)

    def quiet_until(self, scope: str | None, now: float) -> float | None:
        """When a claim for `scope` is next due (monotonic) if it may be skipped now:
        nothing was announced for it since a claim drained its queue less than `recheck_s`
        ago. None: claim now."""
        drained = self._drained.get(scope)
        if drained is None or drained.clock < self._reset:
            return None
        last = self._announced_any if scope is None else self._announced.get(scope, 0)
        due = drained.at + self._recheck_s
        if last > drained.clock or now >= due:
            return None
        return due

    def notify(self, tenant_id: str, count: int = 1) -> None:
        """`count` new requests of the tenant were announced."""
        self._clock += 1
        if len(self._announced) >= _MAX_TRACKED and tenant_id not in self._announced:
            # Forgetting announcements would make old marks look current: void them too.
            self._announced.clear()
            self._reset = self._clock
        self._announced[tenant_id] = self._announced_any = self._clock
        self.ready.add(tenant_id)
        self._parking.wake(tenant_id, count)

    def notify_all(self) -> None:
        """After a reconnect: wake everyone, since announcements may have been lost."""
        self._clock += 1
        self._reset = self._clock
        self._drained.clear()
        self._parking.wake_all()
