"""What every handler of one broker replica shares, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from broker.auth import Authenticator, Principal
from broker.listener import Listener
from broker.metrics import Metrics
from broker.parking import Parking
from broker.settings import BrokerSettings
from broker.store import Store
from broker.waiters import Waiters, WorkSignals

_POLLER_RECORD_EVERY_S = 5.0


@dataclass
class BrokerContext:
    settings: BrokerSettings
    replica_id: str
    store: Store
    auth: Authenticator
    waiters: Waiters
    signals: WorkSignals
    #: this replica's parked long-polls, woken by `signals` or handed work by `store`
    parking: Parking
    listener: Listener
    metrics: Metrics
    #: rotation offset of admin draining over tenants (fairness)
    drain_offset: int = field(default=0)
    #: when this replica last recorded each poller as seen (for /health's "last minute")
    pollers_recorded_at: dict[str, float] = field(default_factory=dict)

    def poller_due(self, poller_id: str, now: float) -> bool:
        """Whether to record the poller as seen now: at most every 5 s per poller."""
        if now - self.pollers_recorded_at.get(poller_id, 0.0) < _POLLER_RECORD_EVERY_S:
            return False
        if len(self.pollers_recorded_at) > 10_000:
            self.pollers_recorded_at.clear()
        self.pollers_recorded_at[poller_id] = now
        return True


def context_of(request: Request) -> BrokerContext:
    ctx: BrokerContext = request.app.state.broker
    return ctx


async def principal_of(request: Request) -> Principal:
    return await context_of(request).auth.authenticate(request.headers.get("authorization"))
