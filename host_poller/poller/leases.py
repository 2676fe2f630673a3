"""Keeping the leases of the requests this poller holds, on this host's monotonic clock.

The broker says how long a lease lasts (`lease_s`, a duration) with every delivery and every
extension; the keeper counts it from when that answer arrived, on `time.monotonic()`. The
broker's wall clock (`lease_expires_at`) is never compared with ours: a 30 s skew made the old
keeper never renew, or renew every 50 ms.

"When the answer arrived" is when this process last ran before reading it: an answer that
sat in a socket while the process was stopped (SIGSTOP, a frozen VM) is as old as the pause.
A heartbeat task notes the monotonic time every `_BEAT_S`; a lease counts from the last beat
before its answer was read (never earlier than the call was sent), so after a pause longer
than the lease, even a request delivered during the pause is known to have lapsed. The
first beat after a gap does not count: it runs before the answers of that pass are read.

- A lease is renewed once half of it has passed, so a slow LLM call is not delivered again.
- A lease is *lost* when an extension is answered `not_leased` / `not_found` / `forbidden`,
  or when it runs out on the local clock before it was renewed (a paused process, a broker
  unreachable for longer than the lease): the broker hands such a request to another poller,
  so `on_lost(request_id)` lets the poller cancel the call in flight, and `holds()` answers
  False so a request not started yet is never started.
- A request is tracked from delivery until its answer is posted (`release`), not merely
  submitted to the poster: a lease that lapsed in between would let the broker redeliver a
  request whose answer is paid for.

Leases this poller never got are the broker's to hand back: `AbandonedPolls` remembers the
long-polls whose answer did not arrive whole, and the next `/pending` reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from host_poller.poller.link import BrokerLink, is_retryable
from rlm_wire.broker_models import PendingRequest
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

logger = logging.getLogger(__name__)

# Never renew more often than this, whatever the lease (a tiny lease would spin).
_MIN_RENEW_S = 0.05
# After a failed extension, try again this soon (bounded by the lease's own expiry).
_RETRY_RENEW_S = 1.0
# How often the heartbeat notes that this process is running (a lease counts from the
# last beat before its answer was read: at most this much shorter than the broker's).
_BEAT_S = 0.05
# A wait between two beats longer than this is a gap (see `_beat`).
_GAP_S = 4 * _BEAT_S
# A call starts (and a lease is handed back) only while at least this share of the lease is
# left. The broker's lease began before its answer arrived here, by however long that took
# (a loaded machine, a slow network): near its local end a lease may already have run out at
# the broker, and the request been handed to another poller. Renewed at half-life, a held
# lease never comes this low unless its renewals failed.
_START_SHARE = 0.25


#: Most lost long-polls remembered (the broker's default RLM_MAX_ABANDONED_POLLS): past it
#: the oldest are forgotten, and what they leased lapses after its lease as before.
MAX_ABANDONED_POLLS = 64


class AbandonedPolls:
    """Long-polls whose answer never arrived whole (a connection cut or reset, a truncated
    body, a read timeout, a broker killed as it answered): the broker may have leased them
    requests this poller never saw. Each long-poll is named by a fresh random poll id; the
    lost ones are reported with the next `/pending` (`abandoned=`, to any broker), which
    hands their requests back at once instead of after their lease (`RLM_LEASE_S`)."""

    def __init__(self, limit: int = MAX_ABANDONED_POLLS) -> None:
        self._ids: deque[str] = deque(maxlen=limit)

    @staticmethod
    def new_poll_id() -> str:
        """A long-poll's name: 128 random bits, URL-safe (22 characters)."""
        return secrets.token_urlsafe(16)

    def lost(self, poll_id: str) -> None:
        self._ids.append(poll_id)

    def to_report(self) -> list[str]:
        return list(self._ids)

    def reported(self, poll_ids: Sequence[str]) -> None:
        """The broker has handed back what these held: forget them."""
        if not poll_ids:  # every successful long-poll comes here, nearly always with none
            return
        done = set(poll_ids)
        kept = [poll_id for poll_id in self._ids if poll_id not in done]
        self._ids.clear()
        self._ids.extend(kept)

    def refused(self, poll_ids: Sequence[str]) -> None:
        """The broker refused this report (`bad_poll_id`: more polls than its
        RLM_MAX_ABANDONED_POLLS): keep only the newest, which any broker takes, so that
        every later call is not refused too."""
        self.reported(poll_ids[:-1] if len(poll_ids) > 1 else poll_ids)


@dataclass
class _Lease:
    expires_at: float
    """Monotonic time the lease runs out, counted from when the broker's answer arrived."""
    renew_at: float
    start_by: float
    """Monotonic time after which a call of this request is no longer started."""


class LeaseKeeper:
    """Tracks the leases this poller holds; its `run()` task renews them at half-life."""

    def __init__(
        self,
        link: BrokerLink,
        *,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_batch: int = 64,
    ) -> None:
        self._link = link
        self._max_batch = max_batch
        """Most leases renewed or handed back in one call (the broker bounds a call's ids by
        RLM_MAX_RESPOND_BATCH; the poller passes its RLM_POLLER_RESPOND_BATCH)."""
        self._on_lost = on_lost
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._changed = asyncio.Event()
        self._wake_at: float | None = None
        """When the renewing task, asleep, wakes next (None: it is awake)."""
        self._last_beat: float | None = None
        self.extensions = 0
        self.lost = 0
        """Leases lost so far (refused by the broker or run out on the local clock)."""

    def __len__(self) -> int:
        return len(self._leases)

    def track(self, request: PendingRequest, *, sent_at: float | None = None) -> None:
        """Hold `request`'s lease, `lease_s` from when its delivery arrived (see the module);
        `sent_at`: when the call that delivered it was sent (monotonic)."""
        lease = self._schedule(request.id, request.lease_s, self.arrived_at(sent_at))
        if self._wake_at is None or min(lease.renew_at, lease.expires_at) < self._wake_at:
            # Woken only when this lease is due before its planned wake: a request a round
            # trip costs no pass over the leases (released leases leave wakes that find
            # nothing due).
            self._changed.set()

    def arrived_at(self, sent_at: float | None) -> float:
        """When an answer read now arrived, at the latest: the last heartbeat (this process
        may have been stopped since), but not before its call was sent."""
        now = self._clock()
        if self._last_beat is None:
            return now
        arrived = min(now, self._last_beat + _BEAT_S)
        return arrived if sent_at is None else max(arrived, min(sent_at, now))

    def holds(self, request_id: str) -> bool:
        """True while the request's lease is this poller's by the local clock."""
        lease = self._leases.get(request_id)
        return lease is not None and self._clock() < lease.expires_at

    def surely_held(self, request_id: str) -> bool:
        """True while the broker cannot have handed the request to another poller yet: at
        least `_START_SHARE` of its lease is left by the local clock (see there). Only then
        may its call start, or its lease be handed back."""
        lease = self._leases.get(request_id)
        return lease is not None and self._clock() < lease.start_by

    def release(self, request_id: str) -> None:
        """Forget a request (its answer is posted, or it was given up): no more renewals."""
        self._leases.pop(request_id, None)

    def _schedule(self, request_id: str, lease_s: float, received_at: float) -> _Lease:
        lease = self._leases[request_id] = _Lease(
            expires_at=received_at + lease_s,
            renew_at=received_at + max(lease_s / 2, _MIN_RENEW_S),
            start_by=received_at + lease_s * (1 - _START_SHARE),
        )
        return lease

    def _lose(self, request_id: str, reason: str) -> None:
        if self._leases.pop(request_id, None) is None:
            return
        self.lost += 1
        logger.warning("lease lost", extra={"request_id": request_id, "reason": reason})
        if self._on_lost is not None:
            self._on_lost(request_id)

    async def run(self) -> None:
        """Renew due leases (and give up lapsed ones) until cancelled."""
        beat = asyncio.create_task(self._beat(), name="poller-lease-heartbeat")
        try:
            await self._renew_forever()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _beat(self) -> None:
        held_back = False
        while True:
            now = self._clock()
            last = self._last_beat
            if last is not None and now - last > _GAP_S and not held_back:
                # Woken after a gap (the process was stopped, or its loop blocked): the beat
                # runs first in the loop's pass after it, before the answers that arrived
                # during the gap are read. Those still count from before the gap, until the
                # next beat (a resumed poller started a call of a lease renewed before its
                # pause and long over at the broker).
                held_back = True
            else:
                held_back = False
                self._last_beat = now
            await asyncio.sleep(_BEAT_S)

    async def _renew_forever(self) -> None:
        while True:
            now = self._clock()
            for rid in [r for r, lease in self._leases.items() if lease.expires_at <= now]:
                self._lose(rid, "ran out before it was renewed")
            due = [rid for rid, lease in self._leases.items() if lease.renew_at <= now]
            if due:
                for batch in self._batches(due):
                    try:
                        await self._extend(batch)
                    except Exception:  # a bug must not stop renewals: log it, retry later
                        logger.exception("lease keeper error")
                        self._retry_later(batch)
                continue
            self._changed.clear()
            wake = min(
                (min(lease.renew_at, lease.expires_at) for lease in self._leases.values()),
                default=now + 3600.0,
            )
            self._wake_at = wake
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(wake - now, 0.0))
            finally:
                self._wake_at = None

    async def hand_back(
        self, request_ids: list[str], polls: Sequence[str]
    ) -> AsyncIterator[tuple[int, int]]:
        """Have the broker deliver again at once requests this poller will not answer, and
        what its lost long-polls `polls` still hold (reported with the first call), in as
        many calls as the broker's bound takes; per call, (requests released, requests the
        polls held). The broker's errors are the caller's."""
        client = self._link.client
        for batch in self._batches(request_ids) or ([[]] if polls else []):
            results = await client.release_leases(batch, polls=polls)
            polls = ()
            released = sum(result.status == "released" for result in results.results)
            yield released, results.from_polls

    def _batches(self, ids: list[str]) -> list[list[str]]:
        """`ids` in calls of at most `max_batch` (the broker refuses more with 413)."""
        return [ids[i : i + self._max_batch] for i in range(0, len(ids), self._max_batch)]

    def _retry_later(self, ids: list[str], delay_s: float = _RETRY_RENEW_S) -> None:
        """Try these renewals again in `delay_s`, and always well before their leases end."""
        now = self._clock()
        for rid in ids:
            lease = self._leases.get(rid)
            if lease is not None:
                margin = max((lease.expires_at - now) / 2, _MIN_RENEW_S)
                lease.renew_at = now + min(delay_s, margin)

    async def _extend(self, ids: list[str]) -> None:
        client = self._link.client
        sent_at = self._clock()
        try:
            results = await client.extend_leases(ids)
        except (ServiceUnreachable, ServiceResponseError) as exc:
            delay = _RETRY_RENEW_S
            if is_retryable(exc):
                self._link.failed(exc, client)
                # At once on the next broker if the link moved on, else the policy's pause.
                delay = min(delay, self._link.delay(exc))
            else:
                logger.error("lease extension refused", extra={"error": str(exc)})
            # A lease that runs out meanwhile is lost, and the broker redelivers the request
            # to another poller: nothing is paid twice.
            self._retry_later(ids, delay)
            return
        arrived = self.arrived_at(sent_at)
        self._link.succeeded()
        for result in results.results:
            if result.id not in self._leases:
                continue  # answered and posted while the extension was in flight
            if result.status == "extended":
                self.extensions += 1
                self._schedule(result.id, results.lease_s, arrived)
            else:
                self._lose(result.id, result.status)
