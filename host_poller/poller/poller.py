"""The poller: leases requests from the broker, answers them concurrently, posts the answers.

    fetch loop ── GET /pending (long-poll, up to the free slots) ──▶ one task per request
    task ──▶ per-tenant semaphore ──▶ RequestHandler (LLM or sub-RLM) ──▶ AnswerPoster
    AnswerPoster ── POST /respond in batches ──▶ broker;  LeaseKeeper renews slow leases

Leases are the poller's promise not to pay twice: a request with less than a quarter of its
lease left (by this host's monotonic clock) is never started, a lost lease cancels the call
in flight, and a request stays held (and renewed) until its answer is posted. With several
broker URLs the `BrokerLink` fails over between them (see link.py).

At most `poller_concurrency` requests are held (leased, until their answer goes to the
poster; answers still being posted do not count) at once, and at most
`poller_tenant_concurrency` of one tenant run at once. `run()` serves until `request_stop()`
(or `stop()`); `run_once()` / `drain()` serve single batches for deterministic tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from host_poller.poller.errors import BrokerRejected
from host_poller.poller.handler import RequestHandler
from host_poller.poller.leases import AbandonedPolls, LeaseKeeper
from host_poller.poller.link import BrokerLink, is_retryable
from host_poller.poller.poster import AnswerPoster
from host_poller.poller.settings import PollerSettings
from rlm_repl import RetryPolicy
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import PendingRequest
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable
from rlm_wire.link import KeepAliveLink
from rlm_wire.transport import HttpxTransport, TransportFactory

logger = logging.getLogger(__name__)

#: Most requests asked for in one /pending (the broker's default cap is 256).
_MAX_FETCH = 256
#: At shutdown, answers get at least this long to be posted even when the grace is spent.
_MIN_FLUSH_S = 2.0
#: RLM_POLLER_HTTP_TRANSPORT: every /pending, /respond and lease extension is on the hot
#: path, where httpx2 cost ~0.5 ms of CPU per request against ~0.05 ms for the keep-alive
#: link (docs/performance.md); httpx2 stays for brokers reached through a proxy.
_TRANSPORTS: dict[str, TransportFactory] = {"link": KeepAliveLink, "httpx": HttpxTransport}


def default_poller_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class PollerStats:
    """Counters of one poller (for tests, logs and metrics)."""

    fetched: int = 0
    answered: int = 0
    failed: int = 0
    abandoned: int = 0
    """Requests given up at shutdown: calls still running when the grace period ended, and
    requests not started yet."""
    handed_back: int = 0
    """Of those, the ones the broker was told to deliver again at once (the others wait out
    their lease)."""
    leases_lost: int = 0
    """Calls cancelled in flight because their lease was lost (the broker redelivers them)."""
    expired_before_start: int = 0
    """Requests never started because their lease was lost or ran out while they waited."""
    lost_polls: int = 0
    """Long-polls whose answer never arrived whole (reported to the broker: `AbandonedPolls`)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """Answers by outcome: "done", or the error code of an error answer."""
    running: int = 0
    max_running: int = 0
    running_by_tenant: Counter[str] = field(default_factory=Counter)
    max_running_by_tenant: Counter[str] = field(default_factory=Counter)


class _TenantGate:
    """A semaphore per tenant, dropped when no request of the tenant is held."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}

    def acquire_ref(self, tenant_id: str) -> asyncio.Semaphore:
        sem, users = self._gates.get(tenant_id, (None, 0))
        if sem is None:
            sem = asyncio.Semaphore(self._limit)
        self._gates[tenant_id] = (sem, users + 1)
        return sem

    def release_ref(self, tenant_id: str) -> None:
        sem, users = self._gates[tenant_id]
        if users <= 1:
            del self._gates[tenant_id]
        else:
            self._gates[tenant_id] = (sem, users - 1)


class Poller:
    """Answers the broker's requests; see the module docstring. An async context manager."""

    def __init__(
        self,
        settings: PollerSettings,
        handler: RequestHandler,
        *,
        client: BrokerClient | None = None,
        poller_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.poller_id = poller_id or default_poller_id()
        self._owns_client = client is None
        # The one retry policy of every broker client; a poller outlasts any outage.
        policy = RetryPolicy(
            deadline_s=math.inf,
            initial_s=settings.poller_backoff_initial_s,
            max_pause_s=settings.poller_backoff_max_s,
        )
        if client is not None:
            self.link = BrokerLink(policy, [client], broker_urls=settings.broker_urls[:1])
        else:
            self.link = BrokerLink.connect(policy, settings.broker_urls, self._new_client)
        self._fetching: BrokerClient | None = None
        self._lost_polls = AbandonedPolls()
        self.leases = LeaseKeeper(
            self.link, on_lost=self._lease_lost, max_batch=settings.poller_respond_batch
        )
        self.poster = AnswerPoster(
            self.link,
            max_items=settings.poller_respond_batch,
            window_s=settings.poller_respond_window_s,
            on_settled=self._settled,
        )
        self.stats = PollerStats()
        self._tenants = _TenantGate(settings.poller_tenant_concurrency)
        self._held: dict[str, asyncio.Task[None]] = {}
        # Answered, not yet posted: a redelivery meanwhile must not be answered again.
        self._unposted: set[str] = set()
        self._started: set[str] = set()
        """Held requests whose call has started (the rest wait for a slot of their tenant)."""
        self._lost: set[str] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._closed = False
        self._serving = False

    def _new_client(self, url: str) -> BrokerClient:
        # retry=None: the link is the only retry layer, so an outage logs once.
        return BrokerClient(
            url,
            self.settings.token().get_secret_value(),
            timeout_s=self.settings.poller_http_timeout_s,
            retry=None,
            max_connections=8,
            poller_id=self.poller_id,
            transport=_TRANSPORTS[self.settings.poller_http_transport],
        )

    @property
    def client(self) -> BrokerClient:
        """The client of the broker this poller talks to now (see `BrokerLink`)."""
        return self.link.client

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Poller:
        self._start_background()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def in_flight(self) -> int:
        """Requests leased by this poller and not answered yet."""
        return len(self._held)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Stop leasing; `run()` then finishes the calls in flight and returns (signal-safe)."""
        if not self._stopping.is_set():
            logger.info(
                "poller stopping", extra={"poller_id": self.poller_id, "in_flight": self.in_flight}
            )
            self._stopping.set()

    async def stop(self) -> None:
        """`request_stop()` and wait until `run()` has returned (or close, if not running)."""
        self.request_stop()
        if self._serving:
            await self._stopped.wait()
        else:
            await self.aclose()

    async def aclose(self) -> None:
        """Finish in-flight calls within the grace period, post their answers, release all."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        await self._finish_in_flight()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        if self._owns_client:
            await self.link.aclose()

    def _start_background(self) -> None:
        if self._closed:
            raise RuntimeError("the poller is closed")
        if not self._background:
            self._background = [
                asyncio.create_task(self.poster.run(), name="poller-poster"),
                asyncio.create_task(self.leases.run(), name="poller-leases"),
            ]

    async def _finish_in_flight(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.poller_grace_s
        # Requests not started yet (waiting for a slot of their tenant) are not started now:
        # handed back at once, unpaid, rather than begun in a grace period that may not see
        # them through. Calls in flight get the grace period; those still running then are
        # cancelled and handed back too. A lease is handed back only while surely still this
        # poller's: one that may have run out at the broker is perhaps another poller's call.
        waiting = {rid: t for rid, t in self._held.items() if rid not in self._started}
        running = {rid: t for rid, t in self._held.items() if rid in self._started}
        given_up = [rid for rid in waiting if self.leases.surely_held(rid)]
        for task in waiting.values():
            task.cancel()
        late: set[asyncio.Task[None]] = set()
        if running:
            _, late = await asyncio.wait(running.values(), timeout=self.settings.poller_grace_s)
            given_up += [
                rid for rid, t in running.items() if t in late and self.leases.surely_held(rid)
            ]
            for task in late:
                task.cancel()
            if late:
                logger.warning(
                    "in-flight calls abandoned after the grace period",
                    extra={"count": len(late), "grace_s": self.settings.poller_grace_s},
                )
        await asyncio.gather(*waiting.values(), *late, return_exceptions=True)
        if self._background:
            flush_s = max(deadline - loop.time(), _MIN_FLUSH_S)
            await self.poster.flush(flush_s)
        await self._hand_back(given_up, max(deadline - loop.time(), _MIN_FLUSH_S))

    async def _hand_back(self, request_ids: list[str], timeout_s: float) -> None:
        """Have the broker deliver again at once what this poller will not answer: the
        requests it gave up, and what its lost long-polls still hold (the next long-poll
        would report those, and a stopping poller makes none: the one cut short by the stop
        among them). On failure they wait out their leases, as before."""
        polls = self._lost_polls.to_report()
        if not request_ids and not polls:
            return
        released = from_polls = 0
        try:
            async with asyncio.timeout(timeout_s):
                async for released_now, from_polls_now in self.leases.hand_back(request_ids, polls):
                    self._lost_polls.reported(polls)  # reported with the first call
                    polls = []
                    released += released_now
                    from_polls += from_polls_now
        except (ServiceUnreachable, ServiceResponseError, TimeoutError) as exc:
            logger.warning(
                "handing back leases failed: left to their leases",
                extra={"count": len(request_ids) - released, "error": str(exc)},
            )
        self.stats.handed_back += released
        if released or from_polls:
            logger.info(
                "leases handed back", extra={"count": released, "from_lost_polls": from_polls}
            )

    # --- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`; raises `BrokerRejected` if the token is refused."""
        self._start_background()
        self._serving = True
        logger.info(
            "poller started",
            extra={"poller_id": self.poller_id, "broker_urls": list(self.settings.broker_urls),
                   "concurrency": self.settings.poller_concurrency,
                   "tenant_concurrency": self.settings.poller_tenant_concurrency},
        )  # fmt: skip
        # One task waits for the stop for the whole run: each long-poll races it (a task
        # made and cancelled per long-poll was a loop pass more per round trip).
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                try:
                    await self._poll_step(stop)
                except BrokerRejected:
                    raise
                except Exception:  # the loop must outlive any one bad batch
                    logger.exception("poll loop error")
                    await self.link.pause(self._stopping)
        finally:
            stop.cancel()
            await self.aclose()
            self._stopped.set()
            logger.info(
                "poller stopped",
                extra={"poller_id": self.poller_id, "answered": self.stats.answered,
                       "failed": self.stats.failed, "abandoned": self.stats.abandoned},
            )  # fmt: skip

    async def _poll_step(self, stop: asyncio.Future[Any]) -> None:
        """One long-poll, unless no slot is free; `stop`: done once the poller stops."""
        free = self._free_slots()
        if free <= 0:
            freed = asyncio.ensure_future(self._slot_freed.wait())
            try:
                await asyncio.wait({freed, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                freed.cancel()
            return
        fetch = asyncio.ensure_future(self._fetch(free, self.settings.poller_wait_s))

        def cut_short(_: object) -> None:
            # Dropping the long-poll's connection lets the broker hand back what it leased.
            fetch.cancel()

        # Awaited itself, not raced with `stop` in `asyncio.wait`: its answer resumes this
        # loop one pass sooner. A stop cancels it; so does this task's own cancellation.
        stop.add_done_callback(cut_short)
        try:
            requests = await fetch
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not fetch.cancelled() or (task is not None and task.cancelling()):
                raise
            return  # cut short by the stop
        except (ServiceUnreachable, ServiceResponseError) as exc:
            if isinstance(exc, ServiceResponseError) and exc.status in (401, 403):
                raise BrokerRejected(exc.status, exc.message) from exc
            if not is_retryable(exc):
                logger.error("pending refused", extra={"error": str(exc)})
            self.link.failed(exc, self._fetching)
            await self.link.pause(self._stopping, exc=exc)
            return
        finally:
            stop.remove_done_callback(cut_short)
        self.link.succeeded()
        for request in requests:
            self._spawn(request)
        if requests:
            # A pass before the next long-poll goes out: calls that answer without waiting
            # (a cached or instant model, a refusal) post their answers first. Their callers
            # wait on those answers; the long-poll would only wait at the broker.
            await asyncio.sleep(0)

    async def run_once(self, *, wait_s: float = 0.0) -> int:
        """Lease one batch, answer it, post the answers; returns how many were leased.

        Broker errors propagate (no backoff): this is the deterministic mode for tests.
        """
        self._start_background()
        free = self._free_slots()
        if free <= 0:
            return 0
        requests = await self._fetch(free, wait_s)
        tasks = [self._spawn(request) for request in requests]
        await asyncio.gather(*(t for t in tasks if t is not None))
        await self.poster.flush(self.settings.poller_http_timeout_s)
        return len(requests)

    async def drain(self) -> int:
        """`run_once()` until a batch comes back empty; total leased."""
        total = 0
        while count := await self.run_once():
            total += count
        return total

    def _free_slots(self) -> int:
        # Cleared before counting, so a slot freed after the count still wakes the loop.
        self._slot_freed.clear()
        return min(self.settings.poller_concurrency - len(self._held), _MAX_FETCH)

    async def _fetch(self, max_items: int, wait_s: float) -> list[PendingRequest]:
        self._fetching = client = self.link.client
        sent_at = time.monotonic()
        poll_id = self._lost_polls.new_poll_id()
        abandoned = self._lost_polls.to_report()
        try:
            batch = await client.pending(
                max_items=max_items, wait_s=wait_s, poll_id=poll_id, abandoned=abandoned
            )
        except ServiceResponseError as exc:
            if exc.code == ErrorCode.BAD_POLL_ID:
                self._lost_polls.refused(abandoned)
            elif exc.status >= 500 or exc.status < 400:  # no answer of the broker's own
                self._poll_lost(poll_id)
            raise
        except ServiceUnreachable as exc:
            if exc.sent:  # else no connection was made: nothing can have been leased to it
                self._poll_lost(poll_id)
            raise
        except BaseException:  # no whole answer (cut, reset, timed out, cancelled)
            self._poll_lost(poll_id)
            raise
        self._lost_polls.reported(abandoned)
        # Leases count from the answer's arrival, on this host's monotonic clock (never the
        # broker's wall clock); see LeaseKeeper.arrived_at.
        for request in batch.requests:
            self.leases.track(request, sent_at=sent_at)
        self.stats.fetched += len(batch.requests)
        return batch.requests

    def _poll_lost(self, poll_id: str) -> None:
        """The long-poll `poll_id` got no whole answer: whatever the broker leased to it is
        handed back when the next one reports it, not after its lease."""
        self._lost_polls.lost(poll_id)
        self.stats.lost_polls += 1

    def _spawn(self, request: PendingRequest) -> asyncio.Task[None] | None:
        if request.id in self._held or request.id in self._unposted:
            # Delivered again while we still work on it or post its answer: its lease is
            # ours again (tracked in _fetch), and it is answered once.
            return None
        task = asyncio.create_task(self._serve(request), name=f"poller-request-{request.id}")
        self._held[request.id] = task
        return task

    def _lease_lost(self, request_id: str) -> None:
        """The broker will hand this request to another poller: stop paying for it here."""
        task = self._held.get(request_id)
        if task is not None and not task.done():
            self._lost.add(request_id)
            task.cancel()

    async def _serve(self, request: PendingRequest) -> None:
        tenant = request.tenant_id
        gate = self._tenants.acquire_ref(tenant)
        answered = started = False
        try:
            async with gate:
                if not self.leases.surely_held(request.id):
                    # Its lease ran out, or nearly, while it waited (a paused process, a
                    # long queue): the broker redelivers it, so starting it now could pay
                    # twice.
                    self.stats.expired_before_start += 1
                    logger.warning(
                        "lease ran out before the call started: left to the broker",
                        extra={"request_id": request.id},
                    )
                    return
                self._enter(tenant)
                started = True
                self._started.add(request.id)
                try:
                    answer = await self.handler.answer(request)
                finally:
                    self._leave(tenant)
            self.poster.submit(answer)
            self._unposted.add(request.id)
            answered = True
            if answer.error is None:
                self.stats.answered += 1
                self.stats.outcomes["done"] += 1
            else:
                self.stats.failed += 1
                self.stats.outcomes[answer.error.code] += 1
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if request.id not in self._lost or task is None:
                raise  # shutdown: the caller's cancellation
            # Cancelled by `_lease_lost`: this request's answer is another poller's now.
            task.uncancel()
            if started:
                self.stats.leases_lost += 1
            else:
                self.stats.expired_before_start += 1
        finally:
            self._tenants.release_ref(tenant)
            if not answered:
                if request.id not in self._lost and self.leases.holds(request.id):
                    self.stats.abandoned += 1
                self.leases.release(request.id)
            self._lost.discard(request.id)
            self._started.discard(request.id)
            self._held.pop(request.id, None)
            self._slot_freed.set()

    def _enter(self, tenant: str) -> None:
        stats = self.stats
        stats.running += 1
        stats.running_by_tenant[tenant] += 1
        stats.max_running = max(stats.max_running, stats.running)
        stats.max_running_by_tenant[tenant] = max(
            stats.max_running_by_tenant[tenant], stats.running_by_tenant[tenant]
        )

    def _leave(self, tenant: str) -> None:
        self.stats.running -= 1
        self.stats.running_by_tenant[tenant] -= 1
        if self.stats.running_by_tenant[tenant] <= 0:
            del self.stats.running_by_tenant[tenant]

    def _settled(self, request_ids: Sequence[str]) -> None:
        """The poster posted (or gave up on) these answers: forget the requests."""
        for request_id in request_ids:
            self._unposted.discard(request_id)
            if request_id not in self._held:
                self.leases.release(request_id)
