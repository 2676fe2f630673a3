"""The runtime's HTTP API (Starlette): sessions, stateless execution, health and metrics.

Errors are `{"error": {"code", "message"}}` with a fitting status, never a traceback. Every
route but /health and /metrics needs the bearer token, which is always configured (the app
is not built without one). Before any route, `HostAndOriginGuard` refuses a `Host` the
runtime does not answer to (DNS rebinding) and any browser `Origin` not allowed.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import pydantic_core
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rlm_wire import runtime_models as p
from rlm_wire.bodies import read_body, read_model
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.responses import error_response, exception_handlers, json_response
from sandbox_runtime.service.context_cache import check_hash
from sandbox_runtime.service.runtime import Runtime
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings

logger = logging.getLogger(__name__)

#: Names a loopback client may use; always answered.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Probes and scrapers call these by pod IP: any Host (they hold nothing a rebinding could steal).
_ANY_HOST_PATHS = frozenset({"/health", "/metrics"})


class HostAndOriginGuard:
    """Pure ASGI middleware: 403 `origin_not_allowed` for a request whose `Origin` header is
    not allowed, 400 `host_not_allowed` for a `Host` the runtime does not answer to."""

    def __init__(self, app: ASGIApp, *, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
        self.app = app
        self._hosts = frozenset(h.lower() for h in hosts if not h.startswith("*."))
        self._suffixes = tuple(h.lower()[1:] for h in hosts if h.startswith("*."))
        self._any_host = "*" in hosts
        self._origins = frozenset(o.rstrip("/").lower() for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        host = _host_name(headers.get("host", ""))
        if origin is not None and origin.rstrip("/").lower() not in self._origins:
            response = error_response(
                403,
                ErrorCode.ORIGIN_NOT_ALLOWED,
                f"requests from origin {origin[:200]!r} are not allowed "
                "(RLM_SANDBOX_ALLOWED_ORIGINS)",
            )
        elif scope["path"] not in _ANY_HOST_PATHS and not self._host_allowed(host):
            response = error_response(
                400,
                ErrorCode.HOST_NOT_ALLOWED,
                f"this runtime does not answer to host {host[:200]!r} "
                "(add it to RLM_SANDBOX_ALLOWED_HOSTS)",
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        return self._any_host or host in self._hosts or host.endswith(self._suffixes)


def _host_name(header: str) -> str:
    """The name of a `Host` header, without its port, brackets or a final dot, lowercased."""
    name = header.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def _context_index(request: Request) -> int:
    """The `index` query parameter of a context upload: which `context_<n>` it binds."""
    raw = request.query_params.get("index", "0")
    if not raw.isdigit() or int(raw) >= p.MAX_CONTEXT_INDEXES:
        raise ApiError(
            400,
            ErrorCode.BAD_REQUEST,
            f"index must be an integer from 0 to {p.MAX_CONTEXT_INDEXES - 1}",
        )
    return int(raw)


def allowed_hosts(settings: RuntimeSettings) -> tuple[str, ...]:
    """Loopback names, the listening address (the URL `rlm up` hands out) and the configured
    names. A wildcard address such as 0.0.0.0 is among them: a browser page reaching it sends
    its `Origin`, refused above, and has no token."""
    return (*LOOPBACK_HOSTS, settings.host, *settings.allowed_hosts)


def create_app(
    settings: RuntimeSettings, worker_settings: WorkerSettings | None = None
) -> Starlette:
    """The ASGI app of one runtime replica; its lifespan starts the pool and the reaper.

    Raises `ValueError` (`NO_BEARER_MESSAGE`, one line) when the settings hold no token.
    """
    token = settings.bearer_token()  # ValueError (one line) without a token: no open runtime
    runtime = Runtime(settings, worker_settings or WorkerSettings())

    def authorize(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "a valid bearer token is required")

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
        index = _context_index(request)
        await runtime.sessions.load_context(request.path_params["session_id"], context, index)
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

    async def put_cached_context(request: Request) -> Response:
        authorize(request)
        name = check_hash(request.path_params["sha256"])
        content = await read_body(request, settings.max_context_bytes)
        created = await runtime.contexts.put(name, content)
        return Response(status_code=201 if created else 204)

    async def head_cached_context(request: Request) -> Response:
        authorize(request)
        held = runtime.contexts.touch(check_hash(request.path_params["sha256"]))
        return Response(status_code=200 if held else 404)

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
            Route("/contexts/{sha256:str}", put_cached_context, methods=["PUT"]),
            Route("/contexts/{sha256:str}", head_cached_context, methods=["HEAD"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(
                HostAndOriginGuard,
                hosts=allowed_hosts(settings),
                origins=settings.allowed_origins,
            )
        ],
        exception_handlers=exception_handlers(
            logger, internal_message="internal error; see the runtime's logs"
        ),
    )
    app.state.runtime = runtime
    return app
