"""The runtime's HTTP API (Starlette): sessions, stateless execution, health and metrics.

Errors are `{"error": {"code", "message"}}` with a fitting status, never a traceback. Every
route but /health and /metrics needs the bearer token when one is configured.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import pydantic_core
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlm_wire import runtime_models as p
from rlm_wire.bodies import read_body, read_model
from rlm_wire.errors import ApiError
from rlm_wire.responses import exception_handlers, json_response
from sandbox_runtime.service.runtime import Runtime
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings

logger = logging.getLogger(__name__)


def create_app(
    settings: RuntimeSettings, worker_settings: WorkerSettings | None = None
) -> Starlette:
    """The ASGI app of one runtime replica; its lifespan starts the pool and the reaper."""
    runtime = Runtime(settings, worker_settings or WorkerSettings())
    token = settings.token.get_secret_value().encode() if settings.token else None
    if token is None:
        logger.warning("no RLM_SANDBOX_TOKEN: the API accepts unauthenticated calls on loopback")

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")

    async def create_session(request: Request) -> Response:
        authorize(request)
        body = await read_model(request, p.CreateSession, settings.max_body_bytes)
        session = await runtime.sessions.create(body)
        return json_response(p.SessionCreated(session_id=session.id), status=201)

    async def execute(request: Request) -> Response:
        authorize(request)
        body = await read_model(request, p.ExecuteRequest, settings.max_body_bytes)
        result = await runtime.sessions.execute(
            request.path_params["session_id"], body.code, body.timeout_s
        )
        return json_response(result)

    async def put_context(request: Request) -> Response:
        authorize(request)
        raw = await read_body(request, settings.max_context_bytes)
        try:
            context = pydantic_core.from_json(raw)
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"the context is not JSON: {exc}") from exc
        if not isinstance(context, str | list | dict):
            raise ApiError(
                422, "invalid_body", "the context must be a JSON string, array or object"
            )
        await runtime.sessions.load_context(request.path_params["session_id"], context)
        return Response(status_code=204)

    async def get_vars(request: Request) -> Response:
        authorize(request)
        variables = await runtime.sessions.list_vars(request.path_params["session_id"])
        return json_response(p.VarsResponse(variables=variables))

    async def get_session(request: Request) -> Response:
        authorize(request)
        return JSONResponse(runtime.sessions.info(request.path_params["session_id"]))

    async def hibernate(request: Request) -> Response:
        authorize(request)
        done = await runtime.sessions.hibernate(request.path_params["session_id"])
        return JSONResponse({"hibernated": done})

    async def delete_session(request: Request) -> Response:
        authorize(request)
        await runtime.sessions.delete(request.path_params["session_id"])
        return Response(status_code=204)

    async def execute_stateless(request: Request) -> Response:
        authorize(request)
        body = await read_model(
            request, p.StatelessExecuteRequest, settings.max_stateless_body_bytes
        )
        return json_response(await runtime.stateless.execute(body))

    async def health(request: Request) -> Response:
        data = runtime.health()
        return JSONResponse(data, status_code=200 if data["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        return Response(
            runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.aclose()

    session_path = "/sessions/{session_id:str}"
    app = Starlette(
        routes=[
            Route("/sessions", create_session, methods=["POST"]),
            Route(session_path, get_session, methods=["GET"]),
            Route(session_path, delete_session, methods=["DELETE"]),
            Route(f"{session_path}/execute", execute, methods=["POST"]),
            Route(f"{session_path}/context", put_context, methods=["PUT"]),
            Route(f"{session_path}/vars", get_vars, methods=["GET"]),
            Route(f"{session_path}/hibernate", hibernate, methods=["POST"]),
            Route("/execute", execute_stateless, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers=exception_handlers(
            logger, internal_message="internal error; see the runtime's logs"
        ),
    )
    app.state.runtime = runtime
    return app
