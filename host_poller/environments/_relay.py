"""A unix socket that relays bytes to the broker: the only way out of a sandbox with no network.

The `command` environment's sandbox sees one socket file (bound into it) and speaks HTTP on
it (`rlm_repl`'s `http+unix://` URLs); each connection is piped to the broker's TCP address
(TLS when the broker URL is https). The relay reads no HTTP: the session token in the requests
is what the broker checks, as for any client. Connections at once are bounded; one over the
bound is closed at once (the REPL retries it with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import urllib.parse
from typing import Any

from rlm_wire.transport import tls_context

logger = logging.getLogger(__name__)

_CHUNK = 65536


class BrokerRelay:
    """Listens on `socket_path` (mode 0600) and pipes each connection to `broker_url`."""

    def __init__(
        self,
        broker_url: str,
        socket_path: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
    ) -> None:
        parsed = urllib.parse.urlsplit(broker_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"the relay needs an http(s) broker URL, got {broker_url!r}")
        self._host = parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._tls = tls_context() if parsed.scheme == "https" else None
        self.socket_path = socket_path
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            logger.warning(
                "relay connection refused: at its bound", extra={"max": len(self._tasks)}
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                up_reader, up_writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._tls
                )
        except (OSError, TimeoutError) as exc:
            # The client sees a closed connection and retries under its policy.
            logger.warning("relay could not reach the broker", extra={"error": str(exc)})
            return
        try:
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            # HTTP clients do not half-close: when either side is done, the exchange is.
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            up_writer.close()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
