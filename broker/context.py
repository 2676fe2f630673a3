"""What every handler of one broker replica shares, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from broker.auth import Authenticator, Principal
from broker.listener import Listener
from broker.metrics import Metrics
from broker.settings import BrokerSettings
from broker.store import Store
from broker.waiters import Waiters, WorkSignals


@dataclass
class BrokerContext:
    settings: BrokerSettings
    replica_id: str
    store: Store
    auth: Authenticator
    waiters: Waiters
    signals: WorkSignals
    listener: Listener
    metrics: Metrics
    #: rotation offset of admin draining over tenants (fairness)
    drain_offset: int = field(default=0)


def context_of(request: Request) -> BrokerContext:
    ctx: BrokerContext = request.app.state.broker
    return ctx


async def principal_of(request: Request) -> Principal:
    return await context_of(request).auth.authenticate(request.headers.get("authorization"))
