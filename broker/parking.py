"""Parked long-polls: the `/pending` calls of one replica waiting for work, in one place.

A long-poll that waits for work is one `LongPoll` here, and either of two things ends its
wait:

- An announcement of new work (`wake`): from another replica through the listener, or from
  an enqueue on this replica whose requests were not handed off. Waking every long-poll of
  a tenant for each request would have all but one of them claim nothing (a wasted Redis
  script per extra poller), so an announcement of n requests wakes the n oldest, and one
  woken that leaves without claiming passes its wake-up on (`leave(used=False)`). Admin
  long-polls (all tenants) are all woken by every announcement instead; they are few.
- A hand-off: an enqueue batch of its tenant on this replica `reserve`s parked long-polls
  *synchronously*, before it awaits its script, so that no second batch in flight can count
  them. The script leases at most their capacity (one script instead of enqueue, then a
  claim by the woken long-poll), and `settle` gives the leased requests to exactly the
  reserved long-polls still waiting. A long-poll that left meanwhile (hung up, or its wait
  ended) gets nothing: what was leased for it comes back from `settle` for the caller to
  hand back at once (`Store.release`). A reserved long-poll that got nothing may be
  reserved again. Admin long-polls are never handed work.

A long-poll `join`s before its claim, so that work announced while the claim runs wakes it;
it may be reserved only once it `park`s (the claim left it waiting). One that stops waiting
while reserved (woken, timed out) waits for its hand-off (`unpark` says so): the script is
already running for it, and the batch settles every reservation when it ends, even when it
fails. A woken long-poll stays reservable until its handler runs again and unparks it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.store import Claimed


class LongPoll:
    """One turn of a `/pending` wait on this replica: up to `max_items` of `tenant_id`'s
    work (None: an admin long-poll, woken by any tenant's work and never handed any)."""

    __slots__ = (
        "doorbell",
        "handed",
        "joined",
        "left",
        "mark",
        "max_items",
        "parked",
        "poll",
        "reserved",
        "since",
        "tenant_id",
        "woken",
    )

    def __init__(self, tenant_id: str | None, max_items: int, poll: str) -> None:
        loop = asyncio.get_running_loop()
        self.tenant_id = tenant_id
        self.max_items = max_items
        #: its tag (`broker.poll_ids.poll_tag`; "": none), recorded with what it is handed
        self.poll = poll
        #: an announcement woke it (a flag: its handler awaits `doorbell`, not this)
        self.woken = False
        #: settled with what an enqueue hands it (cancelled: it took its leave)
        self.handed: asyncio.Future[list[Claimed]] = loop.create_future()
        #: rung (settled) when it is woken or handed work: what its handler waits on
        self.doorbell: asyncio.Future[None] | None = None
        #: the work-announcement clock and the monotonic time when it parked: a hand-off of
        #: fewer than `max_items` drained the queue as of then (`WorkSignals.drained`)
        self.mark = 0
        self.since = 0.0
        #: in the registry (until `leave`)
        self.joined = True
        #: waits for work, so an enqueue may reserve it (not while its claim runs)
        self.parked = False
        #: taken by an enqueue batch whose script is running
        self.reserved = False
        #: stopped waiting for work while reserved: waits for its hand-off only
        self.left = False

    @property
    def reservable(self) -> bool:
        return self.parked and not self.reserved and not self.handed.done()

    def new_doorbell(self) -> asyncio.Future[None]:
        """A future rung when this long-poll is woken or handed work (at once if it already
        is), for its handler to await itself (`Hold.wait_one`): it resumes in the pass the
        news came, not a pass later through a done-callback on `handed`."""
        bell: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.woken or self.handed.done():
            bell.set_result(None)
        self.doorbell = bell
        return bell

    def wake(self) -> bool:
        """Woken by an announcement (once: False if it already was)."""
        if self.woken:
            return False
        self.woken = True
        self._ring()
        return True

    def hand(self, share: list[Claimed]) -> None:
        """Settle its hand-off with `share` (possibly nothing)."""
        self.handed.set_result(share)
        self._ring()

    def _ring(self) -> None:
        if self.doorbell is not None and not self.doorbell.done():
            self.doorbell.set_result(None)


class Parking:
    """The long-polls of one replica waiting for work: per tenant oldest first, and admin."""

    def __init__(self) -> None:
        self._tenants: dict[str, deque[LongPoll]] = {}
        self._admin: set[LongPoll] = set()

    def waiting(self, tenant_id: str) -> int:
        """How many long-polls of the tenant wait for an announcement (not yet woken)."""
        return sum(not poll.woken for poll in self._copy(tenant_id))

    def parked(self, tenant_id: str) -> int:
        """How many long-polls of the tenant an enqueue may reserve now."""
        return sum(poll.reservable for poll in self._copy(tenant_id))

    def join(self, tenant_id: str | None, max_items: int, poll: str = "") -> LongPoll:
        """Wait for work from now on; join *before* reading the queue."""
        long_poll = LongPoll(tenant_id, max_items, poll)
        if tenant_id is None:
            self._admin.add(long_poll)
        else:
            self._tenants.setdefault(tenant_id, deque()).append(long_poll)
        return long_poll

    def park(self, long_poll: LongPoll, mark: int, since: float) -> None:
        """The long-poll now only waits: an enqueue may hand it work (tenants only)."""
        long_poll.mark, long_poll.since = mark, since
        long_poll.parked = long_poll.tenant_id is not None

    def unpark(self, long_poll: LongPoll, *, hung_up: bool) -> bool:
        """The long-poll stops waiting for work. True: it is reserved and still wanted, so
        it should wait for its hand-off (`handed`). Otherwise it can no longer be reserved,
        and a hand-off in flight for it hands its requests back."""
        if long_poll.reserved and not hung_up and not long_poll.handed.done():
            long_poll.left = True
            return True
        long_poll.parked = False
        if not long_poll.handed.done():
            long_poll.handed.cancel()
        return False

    def leave(self, long_poll: LongPoll, *, used: bool) -> None:
        """Gone from here (once; again is a no-op): nothing is handed to it any more, and a
        wake-up it received but did not use goes to the next long-poll of its tenant."""
        if not long_poll.joined:
            return
        long_poll.joined = False
        self.unpark(long_poll, hung_up=True)
        tenant_id = long_poll.tenant_id
        if tenant_id is None:
            self._admin.discard(long_poll)
            return
        waiting = self._tenants[tenant_id]
        waiting.remove(long_poll)  # out of reach of any later wake-up, in this same step
        if not waiting:
            del self._tenants[tenant_id]
        if long_poll.woken and not used:
            self._wake(tenant_id, 1)

    def wake(self, tenant_id: str, count: int) -> None:
        """`count` new requests of the tenant: wake as many of its long-polls, and admin's."""
        self._wake(tenant_id, count)
        self._wake_admin()

    def wake_all(self) -> None:
        """Wake every long-poll (announcements may have been lost)."""
        for tenant_id, waiting in self._tenants.items():
            self._wake(tenant_id, len(waiting))
        self._wake_admin()

    def reserve(self, tenant_id: str, items: int) -> list[LongPoll]:
        """Take parked long-polls, oldest first, until they can take `items` requests."""
        reserved: list[LongPoll] = []
        capacity = 0
        for long_poll in self._tenants.get(tenant_id, ()):
            if capacity >= items:
                break
            if long_poll.reservable:
                long_poll.reserved = True
                reserved.append(long_poll)
                capacity += long_poll.max_items
        return reserved

    def settle(self, reserved: list[LongPoll], leased: list[Claimed]) -> list[Claimed]:
        """Give `leased` to the `reserved` long-polls, in order, each up to its `max_items`
        (as the script leased them, each lease recorded with its poll); those that got
        nothing and still wait for work may be reserved again. Returns what nobody took:
        the share of a long-poll that is gone (for their leases to be handed back)."""
        gone: list[Claimed] = []
        for long_poll in reserved:
            long_poll.reserved = False
            share, leased = leased[: long_poll.max_items], leased[long_poll.max_items :]
            if long_poll.handed.done():  # cancelled: its long-poll is gone
                gone += share
            elif share or long_poll.left:  # one that left waits for this answer, even none
                long_poll.hand(share)
        return gone + leased

    def _wake(self, tenant_id: str, count: int) -> None:
        # Woken long-polls stay queued until they leave: they come first, so this skips few.
        for long_poll in self._tenants.get(tenant_id, ()):
            if count <= 0:
                break
            if long_poll.wake():
                count -= 1

    def _wake_admin(self) -> None:
        waiting, self._admin = self._admin, set()
        for long_poll in waiting:
            long_poll.wake()

    def _copy(self, tenant_id: str) -> tuple[LongPoll, ...]:
        # Taken in one step (no Python code runs while copying): a count may be read from
        # another thread (a test's) while this loop changes the queue.
        return tuple(self._tenants.get(tenant_id, ()))
