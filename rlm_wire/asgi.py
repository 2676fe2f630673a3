"""Raw ASGI serving of a few hot routes, on the same wire as their Starlette versions.

A Starlette request costs its middleware stack (the error and exception middleware, the
router's scan of every route, a `Request`, a `Response`): 2-2.5x the CPU of this layer per
request (the broker's 401: 46-88 us against 19-25 us, docs/performance.md). `LeanRouter`
serves routes of exact paths straight from the ASGI scope and hands everything else (other
paths, HEAD, the lifespan) to the app behind it, unchanged.

A lean handler reads its request through `AsgiRequest`, which offers what `rlm_wire.bodies`
reads from a Starlette `Request` (headers, query values, the body stream, `receive`), and
returns an `Answer`, sent in two `send` calls: `Content-Length` and `Content-Type` as a
Starlette JSON `Response` sends them, plus the answer's own headers (a 429's `Retry-After`).
A known path with another method is answered 405 with `Allow`, as Starlette's router does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.responses import error_body, json_bytes

_CONTENT_TYPE_JSON = (b"content-type", b"application/json")

T = TypeVar("T")


class AsgiRequest:
    """One HTTP request, read straight from its scope; headers and query parsed on first use."""

    __slots__ = ("_headers", "_query", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self._headers: dict[str, str] | None = None
        self._query: dict[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-case names; of a repeated header the first, as Starlette's `Headers.get`."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self.scope["headers"]:
                headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            self._headers = headers
        return self._headers

    @property
    def query_params(self) -> Mapping[str, str]:
        """Of a repeated name the last value, as Starlette's `QueryParams.get`."""
        if self._query is None:
            raw = self.scope["query_string"].decode("latin-1")
            if "%" in raw or "+" in raw:
                self._query = dict(parse_qsl(raw, keep_blank_values=True))
            else:  # nothing to unquote (`?wait=30&max=64`): parse_qsl's split, 4x faster
                self._query = {}
                for part in raw.split("&"):
                    if part:
                        name, _, value = part.partition("=")
                        self._query[name] = value
        return self._query

    async def stream(self) -> AsyncIterator[bytes]:
        """The body's chunks; `ClientDisconnect` (Starlette's) if the client hangs up."""
        while True:
            message = await self.receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()


class Answer(NamedTuple):
    """A JSON answer: status, the encoded body, and extra headers (none: `None`)."""

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


def json_answer(body: bytes | object, status: int = 200) -> Answer:
    """`body` as JSON (bytes are sent as they are: already JSON)."""
    return Answer(status, body if isinstance(body, bytes) else json_bytes(body))


def error_answer(exc: ApiError) -> Answer:
    """The error body every endpoint answers with, and the error's headers."""
    return Answer(exc.status, error_body(exc.code, exc.message), exc.headers or None)


async def send_answer(send: Send, answer: Answer) -> None:
    """`answer` in two `send` calls, with the headers a Starlette JSON `Response` sends."""
    headers = [(b"content-length", b"%d" % len(answer.body)), _CONTENT_TYPE_JSON]
    if answer.headers:
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in answer.headers.items()
        )
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up (or the answer is complete); call it once the body
    has been read, to notice a client that leaves while its call is held."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _settle(wake: asyncio.Future[Any], *_: object) -> None:
    if not wake.done():
        wake.set_result(None)


class _Countdown:
    """A done-callback that settles `wake` once it has been called `left` times."""

    __slots__ = ("left", "wake")

    def __init__(self, wake: asyncio.Future[None], left: int) -> None:
        self.wake = wake
        self.left = left

    def __call__(self, _: object) -> None:
        self.left -= 1
        if self.left <= 0:
            _settle(self.wake)


class Hold:
    """The waits of one held call (a long-poll, a held `/enqueue`): each wait ends when its
    futures are done, at its timeout, or when the client hangs up (`hung_up`).

    Per held call, one task reads `receive` to notice the hang-up (started by `watch()` or
    by the first wait that does not end at once; `close()` cancels it), and each wait is
    one future settled by done-callbacks and a timer. `asyncio.wait` with a second task
    watching the client was ~10 % of the broker's CPU at c=64 (docs/performance.md): its
    coroutine, sets, waiter and callbacks on every future, a `gather` for a batch.
    """

    __slots__ = ("_receive", "_wake", "_watch", "hung_up")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watch: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[Any] | None = None
        #: the client hung up (or its receive failed): nobody is left to answer
        self.hung_up = False

    def watch(self) -> None:
        """Start noticing a hang-up now (e.g. before a step whose work a departed client
        would lose, so that it can be handed back)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(until_disconnect(self._receive))
            self._watch.add_done_callback(self._watched)

    async def wait(self, futures: Sequence[asyncio.Future[Any]], timeout_s: float) -> None:
        """Until every one of `futures` is done, `timeout_s` has passed, or the client has
        hung up; returns at once if one of these holds now."""
        if self.hung_up or timeout_s <= 0:
            return
        waiting = [future for future in futures if not future.done()]
        if not waiting:
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Callbacks left on futures that settle later only find `wake` done: no removal.
        settle: Callable[[object], None] = (
            _Countdown(wake, len(waiting)) if len(waiting) > 1 else functools.partial(_settle, wake)
        )
        for future in waiting:
            future.add_done_callback(settle)
        await self._until(wake, timeout_s)

    async def wait_one(self, future: asyncio.Future[T | None], timeout_s: float) -> None:
        """`wait([future])` for a future the caller owns, in which it reads None as "nothing
        yet": the future is awaited directly and settled with None at the timeout or the
        hang-up. Its result then resumes the caller in one loop pass instead of two (a
        done-callback settling the wake, then the wake): a held `/enqueue` answers a pass
        sooner."""
        if self.hung_up or timeout_s <= 0 or future.done():
            return
        await self._until(future, timeout_s)

    async def _until(self, wake: asyncio.Future[Any], timeout_s: float) -> None:
        """Await `wake`, which the timer and a hang-up settle with None."""
        self._wake = wake
        self.watch()
        timer = asyncio.get_running_loop().call_later(timeout_s, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def _watched(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        task.exception()  # retrieved: a failing receive counts as a hang-up, as before
        self.hung_up = True
        if self._wake is not None:
            _settle(self._wake)

    def close(self) -> None:
        """Stop watching the client (the call is about to answer)."""
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()


#: A lean route's handler. It answers its own errors: one that raises reaches uvicorn, which
#: logs it and answers a bare 500 (the broker's handlers are wrapped by `lean_endpoint`).
LeanHandler = Callable[[AsgiRequest], Awaitable[Answer]]


@dataclass(frozen=True)
class LeanRoute:
    method: str
    path: str
    handler: LeanHandler


class LeanRouter:
    """An ASGI app: `routes` (exact paths) served raw, every other request by `app`."""

    def __init__(self, app: ASGIApp, routes: Sequence[LeanRoute]) -> None:
        self.app = app
        self._lean = list(routes)
        self._by_path: dict[str, dict[str, LeanHandler]] = {}
        for route in routes:
            self._by_path.setdefault(route.path, {})[route.method] = route.handler
        self._not_allowed = {
            path: error_answer(
                ApiError(
                    405,
                    ErrorCode.METHOD_NOT_ALLOWED,
                    "Method Not Allowed",
                    headers={"Allow": ", ".join(sorted(methods))},
                )
            )
            for path, methods in self._by_path.items()
        }

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route: the lean ones (as Starlette `Route`s served by this router), then the
        app's own, so that a route table (the OpenAPI check) sees them all."""
        lean: list[BaseRoute] = [Route(r.path, self, methods=[r.method]) for r in self._lean]
        app_routes: list[BaseRoute] = list(getattr(self.app, "routes", []))
        return lean + app_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            methods = self._by_path.get(path)
            if methods is not None:
                handler = methods.get(scope["method"])
                if handler is None:
                    await send_answer(send, self._not_allowed[path])
                else:
                    await send_answer(send, await handler(AsgiRequest(scope, receive)))
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below `root_path`, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str | None = scope.get("root_path")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path
