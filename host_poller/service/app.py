"""The Starlette application of `rlm serve`.

`create_app(service)` is all a server needs: the service (`RLMService`) is built by the
caller with the broker it runs on (`rlm serve` starts the local stack unless RLM_BROKER_URL
is set) and is closed with the app. The trajectory viewer (`rlm view`'s pages, with its own
guard: loopback only unless RLM_VIEW_TOKEN is set) is mounted at `/view/` over the runs'
trajectory directory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Mount, Route

from host_poller.service import routes, routes_conversations, routes_runs
from host_poller.service.conversations import ConversationRegistry
from host_poller.service.errors import exception_handlers
from host_poller.service.run_store import MemoryRunStore, run_store_for
from host_poller.service.runner import RLMService
from host_poller.service.runs import RunRegistry
from host_poller.viewer import ViewerSettings
from host_poller.viewer import create_app as create_viewer

logger = logging.getLogger(__name__)


def create_app(service: RLMService, viewer: ViewerSettings | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.rlm_service = service
        store = run_store_for(service.settings)
        if isinstance(store, MemoryRunStore):
            logger.warning(
                "runs of /v1/runs are kept in this process's memory (no RLM_SERVE_REDIS_URL): "
                "they will not outlive a restart, and other replicas do not see them"
            )
        app.state.rlm_runs = runs = RunRegistry(service, store)
        await runs.open()
        app.state.rlm_conversations = conversations = ConversationRegistry(service)
        if service.settings.is_open():
            logger.warning("rlm serve runs without API keys (RLM_SERVE_API_KEYS): loopback only")
        try:
            yield
        finally:
            await conversations.aclose()
            await runs.aclose()
            await service.aclose()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/runs", routes_runs.create_run, methods=["POST"]),
            Route("/v1/runs/{run_id}", routes_runs.get_run, methods=["GET"]),
            Route("/v1/runs/{run_id}/events", routes_runs.run_events, methods=["GET"]),
            Route("/v1/runs/{run_id}/cancel", routes_runs.cancel_run, methods=["POST"]),
            Route("/v1/conversations", routes_conversations.create_conversation, methods=["POST"]),
            Route(
                "/v1/conversations/{conversation_id}",
                routes_conversations.get_conversation,
                methods=["GET"],
            ),
            Route(
                "/v1/conversations/{conversation_id}",
                routes_conversations.delete_conversation,
                methods=["DELETE"],
            ),
            Route(
                "/v1/conversations/{conversation_id}/messages",
                routes_conversations.ask,
                methods=["POST"],
            ),
            Route("/health", routes.health, methods=["GET"]),
            Mount("/view", app=create_viewer(service.host.trajectory_dir, viewer)),
        ],
        lifespan=lifespan,
        exception_handlers=dict(exception_handlers(logger)),
    )
