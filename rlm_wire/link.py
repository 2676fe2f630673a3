"""A lean HTTP/1.1 keep-alive transport to one of our services, for hot paths.

Every `llm_query` from a sandbox is one `POST /enqueue` (and, for a long answer, re-waits on
`GET /requests/{id}`) on the runtime's critical path, and every answer a poller posts is one
`POST /respond`. Through httpx2 each request costs ~0.5 ms of CPU in the client's layers;
this link costs ~0.05 ms (docs/performance.md). It is a `rlm_wire.transport.Transport`, so
`BrokerClient` runs over it unchanged. It speaks only what our services' answers need: one
request at a time per connection, heads of CRLF-ended lines (as HTTP/1.1 servers send
them), `Content-Length` or chunked bodies, keep-alive, `http` and `https`; no proxies (use
the default `HttpxTransport` where a proxy is needed).

Failures raise `ServiceUnreachable` (connect, timeout, a broken or malformed answer); an HTTP
status is returned as a `Reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from rlm_wire.errors import ServiceUnreachable
from rlm_wire.transport import KEPT_HEADERS, Reply, tls_context

#: Largest response head and body accepted (our answers are a few KB to a few MB).
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 2**20


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        """Still open: servers close idle keep-alive connections, and the loop sees the
        end of stream long before the connection is reused."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A reused connection ended before any byte of the answer: the request was not read."""


class KeepAliveLink:
    """Keep-alive connections to one service, carrying one bearer token (or none) and
    `headers` on every request."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        max_connections: int = 16,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = tls_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if self._tls else 80)
        host_header = self._host if default_port else f"{self._host}:{self._port}"
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._head_tail = f"Host: {host_header}\r\n{auth}{extra}Accept: application/json\r\n"
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        head_lines: bytes = b"",
    ) -> Reply:
        """Send one request; its answer. `target` is the path and query; `head_lines`:
        more header lines already encoded, each ending in CRLF (a proxied request's)."""
        head = f"{method} {self._prefix}{target} HTTP/1.1\r\n{self._head_tail}"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        message = b"%s%s\r\n%s" % (head.encode("latin-1"), head_lines, body or b"")
        async with self._slots:
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._exchange(message)
            except TimeoutError as exc:
                path = target.split("?", 1)[0]
                raise ServiceUnreachable(
                    f"no answer to {method} {path} within {timeout_s:g} s"
                ) from exc

    async def _exchange(self, message: bytes) -> Reply:
        connection = self._reuse()
        if connection is not None:
            try:
                return await self._roundtrip(connection, message)
            except _StaleConnection:
                pass  # the server closed it as we sent: a new connection, once
        connection = await self._connect()
        try:
            return await self._roundtrip(connection, message)
        except _StaleConnection as exc:
            raise ServiceUnreachable("the service closed the connection without an answer") from exc

    def _reuse(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ServiceUnreachable("the link is closed", sent=False)
        try:
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._tls, limit=MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise ServiceUnreachable(
                f"cannot connect to {self._host}:{self._port}: {exc}", sent=False
            ) from exc
        return _Connection(reader, writer)

    async def _roundtrip(self, connection: _Connection, message: bytes) -> Reply:
        got_bytes = False
        try:
            connection.writer.write(message)
            await connection.writer.drain()
            try:
                # The whole head at once: one search of the buffer, not a call per line.
                head = await connection.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _StaleConnection from exc
                raise
            got_bytes = True
            status, keep_alive, length, chunked, kept = _parse_head(head)
            if chunked:
                body = await _read_chunked(connection.reader)
            else:
                body = await connection.reader.readexactly(length) if length else b""
        except _StaleConnection:
            connection.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            connection.close()
            if not got_bytes and isinstance(exc, ConnectionError):
                raise _StaleConnection from exc
            raise ServiceUnreachable(
                f"broken answer from {self._host}:{self._port}: {exc!r}"
            ) from exc
        except BaseException:  # cancelled or timed out mid-answer: the connection is unusable
            connection.close()
            raise
        if keep_alive and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()
        return Reply(status, body, kept)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, bool, int, bool, dict[str, str]]:
    """(status, keep-alive, content length, chunked, the headers of `KEPT_HEADERS`) from an
    answer's head: its status line and headers, each line ending in CRLF."""
    status_line, *lines = head[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
    status = int(rest[:3])
    keep_alive = version == b"HTTP/1.1"
    length, chunked = 0, False
    kept: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
            if length > MAX_BODY_BYTES:
                raise ValueError(f"answer body of {length} bytes")
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep_alive = token == b"keep-alive" or (keep_alive and token != b"close")
        elif name.decode("latin-1") in KEPT_HEADERS:
            kept[name.decode("latin-1")] = value.strip().decode("latin-1")
    return status, keep_alive, length, chunked, kept


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";", 1)[0], 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        if len(body) + size > MAX_BODY_BYTES:
            raise ValueError("answer body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
