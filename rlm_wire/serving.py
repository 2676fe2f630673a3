"""Serving an ASGI app with uvicorn: the config every service uses, on a thread or in a loop.

`uvicorn_config` is the one place that chooses uvicorn's options: uvloop + httptools unless
told otherwise (the plain asyncio/h11 stack is 3.5x slower, research/broker.md), no access
log, no logging config of uvicorn's own (entry points configure logging), no websockets,
and a bounded graceful shutdown. Every service's HTTP is bounded against hostile clients
there too: httptools under `rlm_wire.http_guard`, with `HttpLimits` (RLM_HTTP_*) read once
per service start. `ThreadedServer` serves on a daemon thread of this process
(tests, benchmarks, the scripted LLM); `LoopServer` serves as a task of the running event
loop (the local stack, foreground commands). Both bind their socket before uvicorn starts, so
a port already in use is a `PortInUseError` at once, not a log line and an exit from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

from rlm_wire.errors import WireError
from rlm_wire.http_guard import guarded_protocol
from rlm_wire.http_limits import HttpLimits

#: The port each service listens on unless told otherwise; docker-compose.yml uses the same.
BROKER_PORT = 8000
SANDBOX_PORT = 8100
SERVE_PORT = 8200
VIEWER_PORT = 8300
FAKE_LLM_PORT = 9000

#: Event loops a service may run on. "asyncio" is for services that uvloop does not suit.
Loop = Literal["uvloop", "asyncio"]


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    graceful_shutdown_s: int = 5,
    loop: Loop = "uvloop",
    keep_alive_s: int = 5,
    log_level: str | None = None,
    limits: HttpLimits | None = None,
) -> uvicorn.Config:
    """uvicorn's config for `app` on `host:port` (0 picks a free port).

    `graceful_shutdown_s` bounds how long in-flight requests may finish after a stop;
    `log_level`, if given, is set on uvicorn's own loggers. `limits` bound what a client may
    hold (read from RLM_HTTP_* when not given); the config is for one server only, as it
    counts that server's connections.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http=guarded_protocol(limits if limits is not None else HttpLimits()),
        ws="none",
        lifespan="on",
        log_config=None,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=graceful_shutdown_s,
        timeout_keep_alive=keep_alive_s,
    )


class ListenError(WireError):
    """A server could not listen on `host:port`; `reason` is the system's."""

    def __init__(self, name: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"{name}: cannot listen on {host}:{port}: {reason}")
        self.name = name
        self.host = host
        self.port = port
        self.reason = reason


class PortInUseError(ListenError):
    """Another process already listens on the port."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name, host, port, "address already in use")

    def __str__(self) -> str:
        return f"{self.name}: port {self.port} on {self.host} is already in use"


def listen_socket(host: str, port: int, *, name: str = "server") -> socket.socket:
    """A socket bound to `host:port` as uvicorn binds one, to hand to `Server.serve(sockets=)`.

    Raises `PortInUseError` when the port is taken, `ListenError` for any other refusal.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(name, host, port) from exc
        raise ListenError(name, host, port, exc.strerror or str(exc)) from exc
    sock.set_inheritable(True)
    return sock


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (the real one when it was asked for port 0)."""
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("the uvicorn server has no listening socket")


class _Served:
    """Where a server listens: `port` and `url` tell the bound port once it has started."""

    def __init__(
        self, server: uvicorn.Server, name: str, start_timeout_s: float, stop_timeout_s: float
    ) -> None:
        self.host: str = server.config.host
        self.port: int = server.config.port
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._server = server

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:12345."""
        return f"http://{self.host}:{self.port}"


class ThreadedServer(_Served):
    """An ASGI app under uvicorn on a daemon thread of this process; a context manager."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        name: str = "uvicorn",
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(uvicorn.Server(config), name, start_timeout_s, stop_timeout_s)
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start serving; returns once the socket is bound and the app's lifespan has run."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} server already started")
        sock = listen_socket(self.host, self.port, name=self.name)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError(f"{self.name} server exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"{self.name} server did not start in time")
            time.sleep(0.01)
        self.port = bound_port(self._server)
        return self

    def stop(self) -> None:
        """Stop serving: in-flight requests get the graceful shutdown, then the thread ends."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=self.stop_timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the owner of the loop handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LoopServer(_Served):
    """An ASGI app under uvicorn as a task of the running event loop.

    With `handle_signals` (a foreground command) uvicorn stops on SIGINT/SIGTERM itself;
    without (an embedded service) the owner calls `stop()`.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        name: str = "uvicorn",
        handle_signals: bool = False,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        server = uvicorn.Server(config) if handle_signals else _EmbeddedServer(config)
        super().__init__(server, name, start_timeout_s, stop_timeout_s)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Self:
        """Start serving; returns once the socket is bound and the app's lifespan has run."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} server already started")
        sock = listen_socket(self.host, self.port, name=self.name)
        self._task = task = asyncio.create_task(
            self._server.serve(sockets=[sock]), name=f"uvicorn-{self.name}"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while not self._server.started:
            if task.done():
                sock.close()
                await task  # raises the start-up error, if there was one
                raise RuntimeError(f"{self.name} server exited during start-up")
            if loop.time() > deadline:
                await self.stop()
                sock.close()
                raise RuntimeError(f"{self.name} server did not start in time")
            await asyncio.sleep(0.01)
        self.port = bound_port(self._server)
        return self

    async def wait(self) -> None:
        """Until the server stops (by `stop()`, or by a signal with `handle_signals`)."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        """Stop serving; after `stop_timeout_s` the server is cancelled."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=self.stop_timeout_s)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
