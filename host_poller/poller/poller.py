"""The poller: leases requests from the broker, answers them concurrently, posts the answers.

    fetch loop ── GET /pending (long-poll, up to the free slots) ──▶ one task per request
    task ──▶ per-tenant semaphore ──▶ RequestHandler (LLM or sub-RLM) ──▶ AnswerPoster
    AnswerPoster ── POST /respond in batches ──▶ broker;  LeaseKeeper renews slow leases

At most `poller_concurrency` requests are held (leased and unanswered) at once, and at most
`poller_tenant_concurrency` of one tenant run at once. `run()` serves until `request_stop()`
(or `stop()`); `run_once()` / `drain()` serve single batches for deterministic tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from host_poller.poller.errors import BrokerRejected
from host_poller.poller.handler import RequestHandler
from host_poller.poller.leases import LeaseKeeper
from host_poller.poller.link import Backoff, BrokerLink
from host_poller.poller.poster import AnswerPoster
from host_poller.poller.settings import PollerSettings
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import PendingRequest
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

logger = logging.getLogger(__name__)

#: Most requests asked for in one /pending (the broker's default cap is 256).
_MAX_FETCH = 256
#: At shutdown, answers get at least this long to be posted even when the grace is spent.
_MIN_FLUSH_S = 2.0


def default_poller_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class PollerStats:
    """Counters of one poller (for tests, logs and metrics)."""

    fetched: int = 0
    answered: int = 0
    failed: int = 0
    abandoned: int = 0
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
        # retries=0: the link below is the only retry layer, so outages log once.
        self.client = client or BrokerClient(
            settings.broker_url,
            settings.token().get_secret_value(),
            timeout_s=settings.poller_http_timeout_s,
            retries=0,
            max_connections=8,
            poller_id=self.poller_id,
        )
        backoff = Backoff(settings.poller_backoff_initial_s, settings.poller_backoff_max_s)
        self.link = BrokerLink(backoff, broker_url=settings.broker_url)
        self.leases = LeaseKeeper(self.client, self.link)
        self.poster = AnswerPoster(
            self.client,
            self.link,
            max_items=settings.poller_respond_batch,
            window_s=settings.poller_respond_window_s,
            on_settled=self._settled,
        )
        self.stats = PollerStats()
        self._tenants = _TenantGate(settings.poller_tenant_concurrency)
        self._held: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._closed = False
        self._serving = False

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
            await self.client.aclose()

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
        tasks = list(self._held.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.poller_grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
                logger.warning(
                    "in-flight calls abandoned after the grace period",
                    extra={"count": len(late), "grace_s": self.settings.poller_grace_s},
                )
        if self._background:
            flush_s = max(deadline - loop.time(), _MIN_FLUSH_S)
            await self.poster.flush(flush_s)

    # --- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`; raises `BrokerRejected` if the token is refused."""
        self._start_background()
        self._serving = True
        logger.info(
            "poller started",
            extra={"poller_id": self.poller_id, "broker_url": self.settings.broker_url,
                   "concurrency": self.settings.poller_concurrency,
                   "tenant_concurrency": self.settings.poller_tenant_concurrency},
        )  # fmt: skip
        try:
            while not self._stopping.is_set():
                try:
                    await self._poll_step()
                except BrokerRejected:
                    raise
                except Exception:  # the loop must outlive any one bad batch
                    logger.exception("poll loop error")
                    await self.link.pause(self._stopping)
        finally:
            await self.aclose()
            self._stopped.set()
            logger.info(
                "poller stopped",
                extra={"poller_id": self.poller_id, "answered": self.stats.answered,
                       "failed": self.stats.failed, "abandoned": self.stats.abandoned},
            )  # fmt: skip

    async def _poll_step(self) -> None:
        free = self._free_slots()
        if free <= 0:
            await _first_of(self._slot_freed.wait(), self._stopping.wait())
            return
        fetch = asyncio.ensure_future(self._fetch(free, self.settings.poller_wait_s))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not fetch.done():
                # Dropping the long-poll's connection lets the broker hand back what it leased.
                fetch.cancel()
                await asyncio.wait({fetch})
        if fetch.cancelled():
            return
        try:
            requests = fetch.result()
        except (ServiceUnreachable, ServiceResponseError) as exc:
            if isinstance(exc, ServiceResponseError) and exc.status in (401, 403):
                raise BrokerRejected(exc.status, exc.message) from exc
            self.link.failed(exc)
            await self.link.pause(self._stopping)
            return
        self.link.succeeded()
        for request in requests:
            self._spawn(request)

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
        batch = await self.client.pending(max_items=max_items, wait_s=wait_s)
        self.stats.fetched += len(batch.requests)
        return batch.requests

    def _spawn(self, request: PendingRequest) -> asyncio.Task[None] | None:
        self.leases.track(request)
        if request.id in self._held:
            return None  # delivered again while we still work on it: the lease is renewed
        task = asyncio.create_task(self._serve(request), name=f"poller-request-{request.id}")
        self._held[request.id] = task
        return task

    async def _serve(self, request: PendingRequest) -> None:
        tenant = request.tenant_id
        gate = self._tenants.acquire_ref(tenant)
        answered = False
        try:
            async with gate:
                self._enter(tenant)
                try:
                    answer = await self.handler.answer(request)
                finally:
                    self._leave(tenant)
            self.poster.submit(answer)
            answered = True
            if answer.error is None:
                self.stats.answered += 1
                self.stats.outcomes["done"] += 1
            else:
                self.stats.failed += 1
                self.stats.outcomes[answer.error.code] += 1
        finally:
            self._tenants.release_ref(tenant)
            if not answered:
                self.stats.abandoned += 1
                self.leases.release(request.id)
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
        for request_id in request_ids:
            if request_id not in self._held:
                self.leases.release(request_id)


async def _first_of(*aws: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
