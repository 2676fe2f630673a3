"""`rlm_wire.link.KeepAliveLink` against a raw HTTP server on loopback that answers with
scripted bytes: how it reads an answer's head and body, and when it keeps a connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from rlm_wire.errors import ServiceUnreachable
from rlm_wire.link import MAX_HEAD_BYTES, KeepAliveLink

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Scripted:
    """Answers the n-th request with `answers[n]` (the last one again after the end), then
    closes the connection if `close_after` says so."""

    answers: list[bytes]
    close_after: bool = False
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.heads.append(head)
                writer.write(self.answers[min(len(self.heads), len(self.answers)) - 1])
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[list[asyncio.Server]]:
    servers: list[asyncio.Server] = []
    yield servers
    for server in servers:
        server.close()


async def link_to(script: Scripted, servers: list[asyncio.Server]) -> KeepAliveLink:
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    servers.append(server)
    script.port = server.sockets[0].getsockname()[1]
    return KeepAliveLink(f"http://127.0.0.1:{script.port}", "tok", max_connections=1)


async def test_an_answer_is_read_and_its_connection_kept(serve: list[asyncio.Server]) -> None:
    answer = (
        b"HTTP/1.1 429 Too Many\r\nServer: x\r\nRetry-After: 3\r\nContent-Type: text/plain\r\n"
        b"Date: now\r\nContent-Length: 4\r\n\r\nbusy"
    )
    script = Scripted([answer])
    link = await link_to(script, serve)
    try:
        for _ in range(2):
            reply = await link.request("POST", "/x", b"{}", timeout_s=5.0, head_lines=b"A: 1\r\n")
            assert (reply.status, reply.body) == (429, b"busy")
            assert dict(reply.headers) == {"retry-after": "3", "content-type": "text/plain"}
    finally:
        await link.aclose()
    assert script.connections == 1
    request_line, *lines = script.heads[0].decode().strip().split("\r\n")
    assert request_line == "POST /x HTTP/1.1"
    assert {"Authorization: Bearer tok", "A: 1", "Content-Length: 2"} <= set(lines)


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),  # no header at all
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: t\r\n\r\n",
            200,
            b"abcde",
        ),
    ],
    ids=["no headers", "chunked"],
)
async def test_bodies_without_a_length(
    serve: list[asyncio.Server], answer: bytes, status: int, body: bytes
) -> None:
    link = await link_to(Scripted([answer, OK]), serve)
    try:
        reply = await link.request("GET", "/x", None, timeout_s=5.0)
        assert (reply.status, reply.body) == (status, body)
        # The answer was read to its end: the next one on the connection is whole.
        assert (await link.request("GET", "/x", None, timeout_s=5.0)).body == b"{}"
    finally:
        await link.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["connection close", "HTTP/1.0"],
)
async def test_a_connection_the_server_ends_is_not_reused(
    serve: list[asyncio.Server], answer: bytes
) -> None:
    script = Scripted([answer], close_after=True)
    link = await link_to(script, serve)
    try:
        for _ in range(2):
            assert (await link.request("GET", "/x", None, timeout_s=5.0)).body == b"{}"
    finally:
        await link.aclose()
    assert script.connections == 2


async def test_an_idle_connection_closed_by_the_server_is_replaced(
    serve: list[asyncio.Server],
) -> None:
    # Closed right after its answer, as an idle keep-alive connection is: the link notices
    # (or the next request finds it stale) and sends on a new connection, once.
    script = Scripted([OK], close_after=True)
    link = await link_to(script, serve)
    try:
        for _ in range(3):
            assert (await link.request("GET", "/x", None, timeout_s=5.0)).status == 200
    finally:
        await link.aclose()
    assert script.connections == 3
    assert len(script.heads) == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: nan\r\n\r\n",
    ],
    ids=["not http", "head too large", "body cut short", "bad length"],
)
async def test_a_broken_answer_is_service_unreachable(
    serve: list[asyncio.Server], answer: bytes
) -> None:
    link = await link_to(Scripted([answer], close_after=True), serve)
    try:
        with pytest.raises(ServiceUnreachable, match="broken answer"):
            await link.request("GET", "/x", None, timeout_s=5.0)
    finally:
        await link.aclose()


async def test_no_answer_at_all_is_service_unreachable(serve: list[asyncio.Server]) -> None:
    link = await link_to(Scripted([b""], close_after=True), serve)
    try:
        with pytest.raises(ServiceUnreachable, match="closed the connection"):
            await link.request("GET", "/x", None, timeout_s=5.0)
    finally:
        await link.aclose()
