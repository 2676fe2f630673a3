"""rlm_wire on real loopback HTTP: the error table, body limits, the client's error mapping."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from broker.redis_server import free_port
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

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
    def __init__(self, base_url: str, retries: int = 0) -> None:
        super().__init__(base_url, "t", timeout_s=5.0, retries=retries, max_connections=4)


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
        assert unchecked.status_code == 404
        full = await client._send("GET", "/full", check=False)
        assert (full.status_code, full.headers.get("retry-after")) == (429, "3")
        assert full.json() == {"error": {"code": "too_many_sessions", "message": "full"}}


async def test_an_unexpected_exception_is_a_logged_500(
    server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Client(server.url) as client:
        with caplog.at_level(logging.ERROR, logger=__name__):
            response = await client._send("GET", "/broken", check=False)
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal error (logged)"}
    }
    assert any(record.exc_info for record in caplog.records)


async def test_connection_failures_raise_the_unreachable_type_after_retries() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}", retries=1) as client:
        with pytest.raises(ServiceUnreachable, match="GET /x"):
            await client._send("GET", "/x")
