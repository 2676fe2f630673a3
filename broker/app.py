"""The broker's application: routes, and the lifespan that opens Redis.

`create_app(settings)` is all a server needs; `rlm broker` serves it with uvicorn
(uvloop + httptools, one worker per process: scale with replicas over one Redis). The three
calls of a round trip are served as raw ASGI (`broker.hot_routes`), the rest by Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Route

from broker import routes_ops, routes_queue, routes_tenancy
from broker.auth import Authenticator
from broker.context import BrokerContext
from broker.hot_routes import BrokerApp
from broker.listener import Listener
from broker.metrics import Metrics
from broker.openapi import openapi_json
from broker.parking import Parking
from broker.redis_calls import LeanPool
from broker.settings import BrokerSettings
from broker.store import Store
from broker.waiters import Waiters, WorkSignals
from rlm_wire.responses import exception_handlers

logger = logging.getLogger(__name__)

#: How long start-up waits for the first subscription before serving anyway (Redis down:
#: the broker still starts, answers 503, and recovers when Redis does).
_SUBSCRIBE_TIMEOUT_S = 5.0


def create_app(settings: BrokerSettings) -> BrokerApp:
    if settings.redis_url is None:
        raise ValueError("create_app needs settings.redis_url (rlm broker starts one if unset)")
    redis_url = settings.redis_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A BlockingConnectionPool whose get and release are cheap (`broker.redis_calls`).
        pool = LeanPool.from_url(
            redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        redis = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        # The subscription blocks for as long as the broker runs: no socket timeout there.
        subscriber = Redis.from_url(redis_url, socket_connect_timeout=settings.redis_timeout_s)
        replica_id = uuid.uuid4().hex[:12]
        subscriber_store = Store(subscriber, settings, replica_id)
        # The one registry of this replica's parked long-polls: announcements wake them
        # (`signals`), an enqueue here may hand them its work (`store`).
        parking = Parking()
        waiters, signals = Waiters(), WorkSignals(settings.work_recheck_s, parking)
        listener = Listener(subscriber_store, waiters, signals)
        store = Store(
            redis,
            settings,
            replica_id,
            listening=lambda: listener.connected,
            announce=signals.notify,
            parking=parking,
        )
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
        app.state.broker = BrokerContext(
            settings=settings,
            replica_id=replica_id,
            store=store,
            auth=Authenticator(redis, store.keys, admin_token, settings.auth_cache_s),
            waiters=waiters,
            signals=signals,
            parking=parking,
            listener=listener,
            metrics=Metrics(),
        )
        listener_task = asyncio.create_task(listener.run(), name="rlm-broker-listener")
        try:
            await asyncio.wait_for(listener.ready.wait(), _SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            logger.warning("starting without a redis subscription; will keep trying")
        logger.info("broker started", extra={"replica_id": replica_id})
        try:
            yield
        finally:
            listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener_task
            await subscriber.aclose()
            await redis.aclose()
            logger.info("broker stopped", extra={"replica_id": replica_id})

    routes = [
        Route("/tenants", routes_tenancy.create_tenant, methods=["POST"]),
        Route("/tenants/self", routes_tenancy.tenant_self, methods=["GET"]),
        Route("/sessions", routes_tenancy.create_session, methods=["POST"]),
        Route("/sessions/{session_id}", routes_tenancy.delete_session, methods=["DELETE"]),
        Route("/requests/{request_id}", routes_queue.get_request, methods=["GET"]),
        Route("/leases/extend", routes_queue.extend_leases, methods=["POST"]),
        Route("/leases/release", routes_queue.release_leases, methods=["POST"]),
        Route("/health", routes_ops.health, methods=["GET"]),
        Route("/health/live", routes_ops.live, methods=["GET"]),
        Route("/metrics", routes_ops.metrics, methods=["GET"]),
        Route(
            "/openapi.json",
            routes_ops.openapi(functools.partial(openapi_json, settings)),
            methods=["GET"],
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # Endpoints answer their own errors (`broker.handling`); this covers the rest.
        exception_handlers=exception_handlers(logger),
    )
    return BrokerApp(app)
