"""Keeping leases of slow requests: extend a request's lease once half of it has run out,
so the broker does not deliver it to another poller (and the LLM is not called twice).

Lease lengths are measured against this host's clock at delivery; a skew between broker and
poller clocks shortens or lengthens the margin, never the correctness (the broker keeps the
first answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from host_poller.poller.link import BrokerLink
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import PendingRequest
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

logger = logging.getLogger(__name__)

# Never renew more often than this, whatever the lease (a tiny lease would spin).
_MIN_RENEW_S = 0.05


class LeaseKeeper:
    """Tracks the leases this poller holds; its `run()` task renews them at half-life."""

    def __init__(self, client: BrokerClient, link: BrokerLink) -> None:
        self._client = client
        self._link = link
        self._renew_at: dict[str, float] = {}
        self._changed = asyncio.Event()
        self.extensions = 0

    def __len__(self) -> int:
        return len(self._renew_at)

    def track(self, request: PendingRequest) -> None:
        self._schedule(request.id, request.lease_expires_at)
        self._changed.set()

    def release(self, request_id: str) -> None:
        self._renew_at.pop(request_id, None)

    def _schedule(self, request_id: str, lease_expires_at: float) -> None:
        left = lease_expires_at - time.time()
        self._renew_at[request_id] = time.monotonic() + max(left / 2, _MIN_RENEW_S)

    async def run(self) -> None:
        """Renew due leases until cancelled."""
        while True:
            now = time.monotonic()
            due = [rid for rid, at in self._renew_at.items() if at <= now]
            if due:
                try:
                    await self._extend(due)
                except Exception:  # a bug must not stop renewals: log it, retry later
                    logger.exception("lease keeper error")
                    for rid in due:
                        if rid in self._renew_at:
                            self._renew_at[rid] = time.monotonic() + 1.0
                continue
            self._changed.clear()
            wait = min(self._renew_at.values(), default=now + 3600.0) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)

    async def _extend(self, ids: list[str]) -> None:
        try:
            results = await self._client.extend_leases(ids)
        except (ServiceUnreachable, ServiceResponseError) as exc:
            if isinstance(exc, ServiceResponseError) and exc.status != 503:
                logger.error("lease extension refused", extra={"error": str(exc)})
            else:
                self._link.failed(exc)
            # Retry later; the lease may lapse meanwhile and the broker redeliver: acceptable.
            for rid in ids:
                if rid in self._renew_at:
                    self._renew_at[rid] = time.monotonic() + min(self._link.backoff.max_s, 1.0)
            return
        self._link.succeeded()
        for result in results.results:
            if result.id not in self._renew_at:
                continue  # answered while the extension was in flight
            if result.status == "extended":
                self.extensions += 1
                self._schedule(result.id, results.lease_expires_at)
            else:
                logger.warning(
                    "lease lost", extra={"request_id": result.id, "status": result.status}
                )
                self._renew_at.pop(result.id, None)
