"""Hand-offs: new work leased by the enqueue script straight to a long-poll parked here.

A tenant's `/pending` that waits for work parks here (as well as on `WorkSignals`). An
enqueue batch of that tenant then `reserve`s parked long-polls *synchronously*, before it
awaits its script: a reserved long-poll leaves the parked set, so no second batch in flight
can count it. The script leases at most their capacity (one script instead of enqueue, then
a claim by the woken long-poll), and `settle` gives the leased requests to exactly the
reserved long-polls still waiting. A long-poll that left meanwhile (hung up, or its wait
ended) gets nothing: what was leased for it comes back from `settle` for the caller to hand
back at once (`Store.release`). A reserved long-poll that got nothing is parked again.

A long-poll that stops waiting while reserved (woken, timed out) waits for its hand-off
(`leave` says so): the script is already running for it, and the batch settles every
reservation when it ends, even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.store import Claimed


class Parked:
    """One long-poll waiting for work: up to `max_items`, settled with what it is handed."""

    __slots__ = ("future", "left", "mark", "max_items", "poll", "reserved", "since", "tenant_id")

    def __init__(
        self, tenant_id: str, max_items: int, mark: int, since: float, poll: str = ""
    ) -> None:
        self.tenant_id = tenant_id
        self.max_items = max_items
        #: its tag (`broker.poll_ids.poll_tag`; "": none), recorded with what it is handed
        self.poll = poll
        #: the work-announcement clock and the monotonic time when it parked: a hand-off of
        #: fewer than `max_items` drained the queue as of then (`WorkSignals.drained`)
        self.mark = mark
        self.since = since
        self.future: asyncio.Future[list[Claimed]] = asyncio.get_running_loop().create_future()
        #: taken by an enqueue batch whose script is running
        self.reserved = False
        #: stopped waiting for work while reserved: waits for its hand-off only
        self.left = False


class Handoffs:
    """The long-polls of one replica parked for their tenant's work, oldest first."""

    def __init__(self) -> None:
        self._parked: dict[str, deque[Parked]] = {}

    def parked(self, tenant_id: str) -> int:
        """How many long-polls of the tenant are parked (and not reserved)."""
        return len(self._parked.get(tenant_id, ()))

    def park(
        self, tenant_id: str, max_items: int, mark: int, since: float, poll: str = ""
    ) -> Parked:
        parked = Parked(tenant_id, max_items, mark, since, poll)
        self._parked.setdefault(tenant_id, deque()).append(parked)
        return parked

    def reserve(self, tenant_id: str, items: int) -> list[Parked]:
        """Take parked long-polls, oldest first, until they can take `items` requests."""
        waiting = self._parked.get(tenant_id)
        reserved: list[Parked] = []
        capacity = 0
        while waiting and capacity < items:
            parked = waiting.popleft()
            parked.reserved = True
            reserved.append(parked)
            capacity += parked.max_items
        if waiting is not None and not waiting:
            del self._parked[tenant_id]
        return reserved

    def settle(self, reserved: list[Parked], leased: list[Claimed]) -> list[Claimed]:
        """Give `leased` to the `reserved` long-polls, in order, each up to its
        `max_items` (as the script leased them, each lease recorded with its poll); park
        again those that got nothing and still wait for work. Returns what nobody took: the
        share of a long-poll that is gone (for their leases to be handed back)."""
        again: list[Parked] = []
        left: list[Claimed] = []
        for parked in reserved:
            parked.reserved = False
            share, leased = leased[: parked.max_items], leased[parked.max_items :]
            if parked.future.done():  # cancelled: its long-poll is gone
                left += share
                continue
            if share:
                parked.future.set_result(share)
            elif parked.left:
                parked.future.set_result([])  # it waits for this answer: nothing came
            else:
                again.append(parked)
        if again:
            waiting = self._parked.setdefault(again[0].tenant_id, deque())
            waiting.extendleft(reversed(again))  # still the oldest
        return left + leased

    def leave(self, parked: Parked, hung_up: bool) -> bool:
        """The long-poll stops waiting for work. True: it is reserved and still wanted, so
        it should wait for its hand-off (`parked.future`). Otherwise it is gone from here,
        and a hand-off in flight for it hands its requests back."""
        if parked.reserved and not hung_up and not parked.future.done():
            parked.left = True
            return True
        self.abandon(parked)
        return False

    def abandon(self, parked: Parked) -> None:
        """Forget the long-poll: unparked, or, if reserved, nothing is handed to it."""
        if not parked.future.done():
            parked.future.cancel()
        waiting = self._parked.get(parked.tenant_id)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(parked)
            if not waiting:
                del self._parked[parked.tenant_id]
