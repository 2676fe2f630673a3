"""The broker's ASGI app: the three calls of an llm_query round trip served as raw ASGI.

`POST /enqueue`, `GET /pending` and `POST /respond` are answered straight from the ASGI
scope (`rlm_wire.asgi.LeanRouter`): Starlette's request cycle around them (its error and
exception middleware, the router, `Request`, `Response`) was about 10 % of the broker's CPU
at c=64, the lean layer is about 2 % (docs/performance.md). `HEAD /pending` is a 405 here:
a long-poll's HEAD would lease work and drop it with the body it never sends.

Their handlers (`broker.routes_queue`) are their only implementation, with the same auth,
limits, error bodies and metrics. Every other request, and the lifespan that opens Redis,
goes to the Starlette app unchanged.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import State

from broker import routes_queue
from broker.context import BrokerContext
from broker.handling import HotHandler
from rlm_wire.asgi import Answer, AsgiRequest, LeanHandler, LeanRoute, LeanRouter


class BrokerApp(LeanRouter):
    """The hot routes served raw, then `app`; `state` is the Starlette app's (the context
    its lifespan builds)."""

    def __init__(self, app: Starlette) -> None:
        self.starlette = app
        super().__init__(
            app,
            [
                LeanRoute("POST", "/enqueue", self._bind(routes_queue.enqueue)),
                LeanRoute("GET", "/pending", self._bind(routes_queue.pending)),
                LeanRoute("POST", "/respond", self._bind(routes_queue.respond)),
            ],
        )

    @property
    def state(self) -> State:
        return self.starlette.state

    def _bind(self, handler: HotHandler) -> LeanHandler:
        state = self.starlette.state

        async def serve(request: AsgiRequest) -> Answer:
            ctx: BrokerContext = state.broker  # set by the lifespan before any request
            return await handler(ctx, request)

        return serve
