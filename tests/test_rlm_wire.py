"""rlm_wire on real loopback HTTP: the error table, body limits, the client's error mapping."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.redis_server import free_port
from rlm_repl import RetryPolicy
from rlm_wire import (
    ApiClient,
    ApiError,
    ServiceResponseError,
    ServiceUnreachable,
    ThreadedServer,
    exception_handlers,
    json_response,
    uvicorn_config,
)
from rlm_wire.bodies import read_json, read_model
from rlm_wire.http_limits import HttpLimits, connection_budget, raise_fd_limit

pytestmark = pytest.mark.anyio


class Item(BaseModel):
    name: str
    count: int = 1


def _app() -> Starlette:
    async def model(request: Request) -> Response:
        return json_response(await read_model(request, Item, 64, empty=None))

    async def raw(request: Request) -> Response:
        return json_response({"got": await read_json(request, 64)})

    async def missing(request: Request) -> Response:
        raise ApiError(404, "unknown_thing", "no such thing")

    async def full(request: Request) -> Response:
        raise ApiError(429, "too_many_sessions", "full", headers={"Retry-After": "3"})

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def text(request: Request) -> Response:
        return PlainTextResponse("not json", status_code=502)

    return Starlette(
        routes=[
            Route("/model", model, methods=["POST"]),
            Route("/raw", raw, methods=["POST"]),
            Route("/missing", missing),
            Route("/full", full),
            Route("/broken", broken),
            Route("/text", text),
        ],
        exception_handlers=exception_handlers(logging.getLogger(__name__)),
    )


class Client(ApiClient):
    def __init__(self, base_url: str, retry: RetryPolicy | None = None) -> None:
        super().__init__(base_url, "t", timeout_s=5.0, retry=retry, max_connections=4)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    config = uvicorn_config(_app(), "127.0.0.1", 0, loop="asyncio", graceful_shutdown_s=1)
    with ThreadedServer(config, name="test-rlm-http") as running:
        yield running


def test_threaded_server_reports_the_bound_port(server: ThreadedServer) -> None:
    assert server.port != 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def test_bodies_are_parsed_limited_and_validated(server: ThreadedServer) -> None:
    async with Client(server.url) as client:
        item = await client._call("POST", "/model", Item, body=b'{"name": "a"}')
        assert item == Item(name="a")
        cases = [
            ("/model", b"", 400, "bad_request"),
            ("/model", b"{nope", 400, "bad_request"),
            ("/model", b'{"count": "x"}', 422, "invalid_body"),
            ("/raw", b'"' + b"x" * 100 + b'"', 413, "payload_too_large"),
        ]
        for path, body, status, code in cases:
            with pytest.raises(ServiceResponseError) as caught:
                await client._send("POST", path, body=body)
            assert (caught.value.status, caught.value.code) == (status, code), path


async def test_error_answers_map_back_to_typed_errors(server: ThreadedServer) -> None:
    async with Client(server.url) as client:
        with pytest.raises(ServiceResponseError) as caught:
            await client._send("GET", "/missing")
        assert (caught.value.status, caught.value.code) == (404, "unknown_thing")
        assert caught.value.message == "no such thing"
        with pytest.raises(ServiceResponseError) as caught:
            await client._send("GET", "/nowhere")
        assert caught.value.code == "not_found"
        with pytest.raises(ServiceResponseError) as caught:
            await client._send("GET", "/text")
        assert (caught.value.status, caught.value.code) == (502, "unexpected_body")
        unchecked = await client._send("GET", "/missing", check=False)
        assert unchecked.status == 404
        full = await client._send("GET", "/full", check=False)
        assert (full.status, full.headers.get("retry-after")) == (429, "3")
        assert json.loads(full.body) == {"error": {"code": "too_many_sessions", "message": "full"}}


async def test_an_unexpected_exception_is_a_logged_500(
    server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Client(server.url) as client:
        with caplog.at_level(logging.ERROR, logger=__name__):
            response = await client._send("GET", "/broken", check=False)
    assert response.status == 500
    assert json.loads(response.body) == {
        "error": {"code": "internal_error", "message": "internal error (logged)"}
    }
    assert any(record.exc_info for record in caplog.records)


async def test_connection_failures_raise_the_unreachable_type_after_retries() -> None:
    retry = RetryPolicy(deadline_s=0.2, initial_s=0.01)
    async with Client(f"http://127.0.0.1:{free_port()}", retry=retry) as client:
        with pytest.raises(ServiceUnreachable, match="GET /x"):
            await client._send("GET", "/x")


# --- the guard against hostile clients (rlm_wire.http_guard), on real loopback sockets ------

GUARD_LIMITS = HttpLimits(
    max_head_bytes=4096, head_timeout_s=0.5, body_timeout_s=0.5, max_connections=4
)


#: Set by a test once it has read the head of `/stream`: only then does its body come.
STREAM_RELEASED = threading.Event()


def _guarded_app() -> Starlette:
    async def echo(request: Request) -> Response:
        return PlainTextResponse(str(len(await request.body())))

    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)  # twice the timeouts: answering is not bounded by them
        return PlainTextResponse(str(len(await request.body())))

    async def big(request: Request) -> Response:
        return PlainTextResponse("x" * (1 << 20))

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            await asyncio.to_thread(STREAM_RELEASED.wait, 10)
            yield b"late"

        return StreamingResponse(chunks())

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/slow", slow),
            Route("/stream", stream),
            Route("/big", big),
        ]
    )


@pytest.fixture(scope="module")
def guarded() -> Iterator[ThreadedServer]:
    config = uvicorn_config(_guarded_app(), "127.0.0.1", 0, limits=GUARD_LIMITS)
    with ThreadedServer(config, name="test-rlm-guard") as running:
        yield running


def _post(body: bytes, head_padding: int = 0) -> bytes:
    padding = b"X-Pad: %s\r\n" % (b"p" * head_padding) if head_padding else b""
    return b"POST /echo HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
        padding,
        len(body),
        body,
    )


async def _exchange(
    port: int, *pieces: bytes, answers: int = 1, source: str = "127.0.0.1"
) -> list[bytes]:
    """Send `pieces` on one connection, then read `answers` whole answers (Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        got = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            got.append(head + await reader.readexactly(length))
        return got
    finally:
        writer.close()


async def test_the_guard_serves_heads_under_the_limit_and_bodies_over_it(
    guarded: ThreadedServer,
) -> None:
    near_limit = _post(b"{}", head_padding=3900)
    (answer,) = await _exchange(guarded.port, near_limit)
    assert answer.startswith(b"HTTP/1.1 200 ")
    big = b"x" * (1 << 20)  # one write, far past the head budget: the body is not the head
    (answer,) = await _exchange(guarded.port, _post(big))
    assert answer.endswith(b"\r\n\r\n%d" % len(big))
    trickled = [near_limit[i : i + 100] for i in range(0, len(near_limit), 100)]
    (answer,) = await _exchange(guarded.port, *trickled)
    assert answer.startswith(b"HTTP/1.1 200 ")
    pipelined = await _exchange(guarded.port, _post(b"ab") + _post(b"abc"), answers=2)
    assert [a.rsplit(b"\r\n", 1)[1] for a in pipelined] == [b"2", b"3"]
    # A chunked body of many tiny chunks: far more framing than the head budget, in one
    # write and in many, is still a body (only framing without body bytes is bounded).
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [b"1\r\nx\r\n"] * 8000 + [b"0\r\n\r\n"]
    (answer,) = await _exchange(guarded.port, chunked + b"".join(chunks))
    assert answer.endswith(b"\r\n\r\n8000")
    (answer,) = await _exchange(guarded.port, chunked, *chunks[-200:])
    assert answer.endswith(b"\r\n\r\n199")


async def test_the_guard_times_transfers_not_answers_nor_idle_keep_alive(
    guarded: ThreadedServer,
) -> None:
    slow = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
    (answer,) = await _exchange(guarded.port, slow)
    assert answer.endswith(b"\r\n\r\n0")
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        for _ in range(2):  # the second request after an idle pause longer than the timeouts
            writer.write(_post(b"{}"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            await reader.readexactly(1)
            await asyncio.sleep(0.8)
    finally:
        writer.close()


def _data_segments_in(sock: socket.socket) -> int:
    """Segments with data that `sock` has received: Linux's `tcp_info.tcpi_data_segs_in`,
    at byte 152 of the struct since Linux 4.6 (the struct only ever grows at its end)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("=I", info, 152)[0])


async def test_an_answer_is_one_write_and_a_streams_head_is_not_held(
    guarded: ThreadedServer,
) -> None:
    """uvicorn writes a response's head and its body apart (two segments on the wire); the
    guarded protocol sends them as one. A stream whose body comes later still gets its
    head at once: the head is held only until the end of the server's loop pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        sock = writer.get_extra_info("socket")
        before = _data_segments_in(sock)
        for size in range(5):
            writer.write(_post(b"x" * size))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(1) == b"%d" % size
        assert _data_segments_in(sock) - before == 5
        # A large body follows its head, not copied into one write, and arrives whole.
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 1048576" in head
        assert await reader.readexactly(1 << 20) == b"x" * (1 << 20)
        STREAM_RELEASED.clear()
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head
        STREAM_RELEASED.set()
        assert (
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == b"4\r\nlate\r\n0\r\n\r\n"
        )
    finally:
        STREAM_RELEASED.set()
        writer.close()


async def test_the_guard_caps_connections_in_total(guarded: ThreadedServer) -> None:
    held = [
        await asyncio.open_connection("127.0.0.1", guarded.port, local_addr=(f"127.0.0.{i}", 0))
        for i in range(2, 2 + GUARD_LIMITS.max_connections)
    ]
    try:
        for _, writer in held:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # each busy for a second
        await asyncio.sleep(0.1)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _exchange(guarded.port, _post(b"{}"), source="127.0.0.9")
        for reader, _ in held:  # the held ones are served to the end
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
                b"HTTP/1.1 200 "
            )
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)  # the server sees the closes
    (answer,) = await _exchange(guarded.port, _post(b"{}"), source="127.0.0.9")
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_the_connection_budget_stays_below_the_descriptor_limit() -> None:
    soft = raise_fd_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    roomy = HttpLimits(max_connections=10**7, fd_reserve=100)
    assert connection_budget(roomy) == soft - 100
    assert connection_budget(HttpLimits(max_connections=10)) == 10


def test_the_wires_context_bound_is_the_repls() -> None:
    # rlm_wire may not import the REPL, so the runtime's wire carries its own copy of the
    # bound on context indexes: the two must agree, or a context the host may load would be
    # refused by the runtime (or the other way round).
    from rlm_repl import MAX_CONTEXTS
    from rlm_wire.runtime_models import MAX_CONTEXT_INDEXES

    assert MAX_CONTEXT_INDEXES == MAX_CONTEXTS
