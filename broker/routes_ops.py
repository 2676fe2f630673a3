"""Monitoring and description, all without auth: `GET /health`, `GET /health/live`,
`GET /metrics` (Prometheus text format) and `GET /openapi.json`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from broker import __version__
from broker.context import context_of
from broker.handling import Handler, endpoint
from rlm_wire import broker_models as p
from rlm_wire.responses import json_response

logger = logging.getLogger(__name__)

_LIVE = p.Liveness().model_dump_json()


@endpoint("health")
async def health(request: Request) -> Response:
    ctx = context_of(request)
    started = time.perf_counter()
    try:
        await ctx.store.redis.ping()
        rtt_ms = (time.perf_counter() - started) * 1000
        pending, leased, oldest = await ctx.store.queue_depths()
        pollers = await ctx.store.pollers_since(60)
    except (RedisError, ConnectionError, TimeoutError) as exc:
        body = p.Health(
            status="degraded",
            version=__version__,
            replica_id=ctx.replica_id,
            redis={"reachable": False, "error": f"{type(exc).__name__}: {exc}"},
            waiters=len(ctx.waiters),
        )
        return json_response(body.model_dump_json(), 503)
    body = p.Health(
        status="ok",
        version=__version__,
        replica_id=ctx.replica_id,
        redis={"reachable": True, "rtt_ms": round(rtt_ms, 3), "subscribed": ctx.listener.connected},
        queues=p.QueueDepths(pending=pending, leased=leased, oldest_pending_age_s=oldest),
        pollers_last_minute=pollers,
        waiters=len(ctx.waiters),
    )
    return json_response(body.model_dump_json())


@endpoint("live")
async def live(request: Request) -> Response:
    """Liveness: the process serves HTTP. Touches no Redis (that is `/health`'s job)."""
    return json_response(_LIVE)


@endpoint("metrics")
async def metrics(request: Request) -> Response:
    ctx = context_of(request)
    ctx.metrics.waiters.set(len(ctx.waiters))
    try:
        pending, leased, oldest = await ctx.store.queue_depths()
        pollers = await ctx.store.pollers_since(60)
    except (RedisError, ConnectionError, TimeoutError) as exc:
        # Scrapes go on during an outage; the queue gauges keep their last values.
        logger.debug("queue depths unavailable for /metrics", extra={"error": str(exc)})
        ctx.metrics.redis_up.set(0)
    else:
        ctx.metrics.redis_up.set(1)
        ctx.metrics.queue_pending.set(pending)
        ctx.metrics.queue_leased.set(leased)
        ctx.metrics.queue_oldest_age.set(oldest or 0.0)
        ctx.metrics.pollers_last_minute.set(pollers)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def openapi(build: Callable[[], bytes]) -> Handler:
    """`GET /openapi.json`: the document `build` makes (`broker.openapi`), built on the first
    request and kept: building it costs a broker's start-up ~50-300 ms nobody may need."""
    built: list[bytes] = []

    @endpoint("openapi")
    async def serve(request: Request) -> Response:
        if not built:
            built.append(build())
        return json_response(built[0])

    return serve
