"""The poller's view of its brokers: which one it talks to, when to try again, one log line
per outage.

A poller may be given several broker URLs (`RLM_BROKER_URL=http://a:8000,http://b:8000`).
All of them share one Redis, so any broker leases, renews and accepts the answers of any
request: the link keeps one `BrokerClient` per URL and hands out the *current* one. When a
call to the current broker fails (unreachable, or 502/503/504), the link moves on to the
next URL at once; only once every URL has failed in a row does it pause, with the project's
one retry policy (`rlm_repl.RetryPolicy`, an infinite deadline: a poller outlasts any
outage), honouring a `Retry-After` the broker sent with 429/503. A dead replica therefore
neither idles its pollers nor strands their finished answers.

The `BrokerClient`s are built with `retry=None`, so this is the only retry layer and an outage
logs "broker unreachable" once and "broker reachable again" once, not every try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from rlm_repl import RETRYABLE_STATUSES, RetryClock, RetryPolicy, retry_after_s
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

logger = logging.getLogger(__name__)

#: Statuses after which the link tries the next broker: that replica (or its path to Redis)
#: is in trouble. A 429 is the tenant's quota, the same on every replica: not a reason.
_FAILOVER_STATUSES = frozenset({502, 503, 504})


def is_retryable(exc: BaseException) -> bool:
    """True for a failure worth trying again: no connection, or a retryable status."""
    if isinstance(exc, ServiceUnreachable):
        return True
    return isinstance(exc, ServiceResponseError) and exc.status in RETRYABLE_STATUSES


def retry_after_of(exc: BaseException) -> str | None:
    """The `Retry-After` header a broker sent with an error, if it sent one."""
    if not isinstance(exc, ServiceResponseError):
        return None
    for name, value in exc.headers.items():
        if str(name).lower() == "retry-after":
            return str(value)
    return None


class BrokerLink:
    """Shared by the poll loop, the answer poster and the lease keeper of one poller."""

    def __init__(
        self,
        policy: RetryPolicy,
        clients: Sequence[BrokerClient],
        *,
        broker_urls: Sequence[str],
    ) -> None:
        if not clients or len(clients) != len(broker_urls):
            raise ValueError("BrokerLink needs one client per broker URL, at least one")
        self.policy = policy
        self._clients = list(clients)
        self._urls = list(broker_urls)
        self._index = 0
        self._failures = 0
        self._since_pause = 0
        """Brokers that failed since the last pause: a round ends when each one has."""
        self._clock: RetryClock | None = None
        self._outage_started: float | None = None
        self.outages = 0
        """Outages seen so far (for tests and metrics)."""
        self.failovers = 0
        """Times the link moved on to another broker URL."""

    @classmethod
    def connect(
        cls,
        policy: RetryPolicy,
        broker_urls: Sequence[str],
        client_for: Callable[[str], BrokerClient],
    ) -> BrokerLink:
        """A link with one client per URL, built by `client_for(url)`."""
        return cls(policy, [client_for(url) for url in broker_urls], broker_urls=broker_urls)

    @property
    def client(self) -> BrokerClient:
        """The client of the broker this poller talks to now."""
        return self._clients[self._index]

    @property
    def clients(self) -> list[BrokerClient]:
        return list(self._clients)

    @property
    def broker_url(self) -> str:
        """The URL of the current broker."""
        return self._urls[self._index]

    @property
    def failed_tries(self) -> int:
        """Failed calls in the current outage (0 when the broker is reachable)."""
        return self._failures

    @property
    def reachable(self) -> bool:
        return self._outage_started is None

    def failed(self, exc: BaseException, client: BrokerClient | None = None) -> None:
        """Record a failed call made with `client` (default: the current one).

        The first failure of an outage is logged. A failure of the current broker moves the
        link to the next URL; a failure reported late, for a broker the link already left,
        does not move it again (two loops failing together must not skip a good broker).
        """
        self._failures += 1
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self._clock = self.policy.start()
            self.outages += 1
            logger.warning(
                "broker unreachable",
                extra={"broker_url": self.broker_url, "error": f"{type(exc).__name__}: {exc}"},
            )
        if client is not None and client is not self.client:
            return
        self._since_pause += 1
        failover = not isinstance(exc, ServiceResponseError) or exc.status in _FAILOVER_STATUSES
        if failover and len(self._clients) > 1:
            self._index = (self._index + 1) % len(self._clients)
            self.failovers += 1
            logger.info("trying the next broker", extra={"broker_url": self.broker_url})

    def succeeded(self) -> None:
        """Record a successful call; the end of an outage is logged."""
        if self._outage_started is not None:
            logger.info(
                "broker reachable again",
                extra={
                    "broker_url": self.broker_url,
                    "outage_s": round(time.monotonic() - self._outage_started, 3),
                    "failed_tries": self._failures,
                },
            )
            self._outage_started = None
            self._clock = None
        self._failures = 0
        self._since_pause = 0

    def delay(self, exc: BaseException | None = None) -> float:
        """The pause before the next try: none while other brokers are left to try in this
        round, else the retry policy's (at least the broker's `Retry-After`)."""
        if self._failures == 0:
            return 0.0
        hint = retry_after_of(exc) if exc is not None else None
        if retry_after_s(hint) is None and self._since_pause < len(self._clients):
            return 0.0
        self._since_pause = 0
        clock = self._clock or self.policy.start()
        pause = clock.next_pause(hint)
        # An infinite deadline never runs out; a finite one falls back to the longest pause.
        return pause if pause is not None else self.policy.max_pause_s

    async def pause(
        self,
        stopping: asyncio.Event | None = None,
        *,
        max_s: float | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Wait before the next try (see `delay`), at most `max_s`, less if `stopping`."""
        delay = self.delay(exc)
        if max_s is not None:
            delay = max(0.0, min(delay, max_s))
        if delay <= 0:
            await asyncio.sleep(0)
            return
        if stopping is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
