"""The poller's view of the broker's reachability: jittered backoff, one log line per outage.

`BrokerClient` is built with `retries=0` for the poller, so this is the only retry layer and
an outage logs "broker unreachable" once and "broker reachable again" once, not every try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: try n waits in [d/2, d], d = min(max, initial * 2**n)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.factor < 1:
            raise ValueError("Backoff needs 0 < initial_s <= max_s and factor >= 1")

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class BrokerLink:
    """Shared by the poll loop, the answer poster and the lease keeper of one poller."""

    def __init__(self, backoff: Backoff, *, broker_url: str) -> None:
        self.backoff = backoff
        self.broker_url = broker_url
        self._failures = 0
        self._outage_started: float | None = None
        self.outages = 0
        """Outages seen so far (for tests and metrics)."""

    @property
    def failed_tries(self) -> int:
        """Failed calls in the current outage (0 when the broker is reachable)."""
        return self._failures

    @property
    def reachable(self) -> bool:
        return self._outage_started is None

    def failed(self, exc: BaseException) -> None:
        """Record a failed call; the first failure of an outage is logged."""
        self._failures += 1
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self.outages += 1
            logger.warning(
                "broker unreachable",
                extra={"broker_url": self.broker_url, "error": f"{type(exc).__name__}: {exc}"},
            )

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
        self._failures = 0

    async def pause(
        self, stopping: asyncio.Event | None = None, *, max_s: float | None = None
    ) -> None:
        """Wait the backoff delay of the current outage, at most `max_s`, less if `stopping`."""
        delay = self.backoff.delay(max(self._failures - 1, 0))
        if max_s is not None:
            delay = max(0.0, min(delay, max_s))
        if stopping is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)
