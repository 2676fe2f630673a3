"""`LinkClient.build_request`: the `Request` httpx2 builds, from a URL parsed once.

The SDK builds every request through it; the lean path must give what httpx2's own
`build_request` gives for the same arguments (the wire is checked end to end in
tests/test_llm_completion.py, over both transports)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from host_poller.llm.transport import LinkClient, LinkTransport

BASE = "http://127.0.0.1:9/v1"
SDK_HEADERS = [
    ("authorization", "Bearer k"),
    ("accept", "application/json"),
    ("content-type", "application/json"),
    ("user-agent", "AsyncOpenAI/Python"),
]


@pytest.fixture
async def client() -> AsyncIterator[LinkClient]:
    link = LinkClient(LinkTransport(BASE, max_connections=1))
    try:
        yield link
    finally:
        await link.aclose()


def fields(request: httpx2.Request) -> tuple[Any, ...]:
    return (
        request.method,
        str(request.url),
        request.headers.raw,
        request.content,
        request.extensions,
        type(request.stream),
    )


CALLS: list[tuple[str, dict[str, Any]]] = [
    ("the SDK's post", {"content": b'{"a": 1}', "timeout": httpx2.Timeout(5.0)}),
    ("an empty post", {"content": None, "timeout": httpx2.Timeout(5.0, connect=1.0)}),
    ("no timeout", {"content": b"x", "timeout": None}),
    ("the client's timeout", {"content": b"x"}),
    ("a host and a chunked body set", {
        "content": b"x",
        "headers": [*SDK_HEADERS, ("Host", "h"), ("Transfer-Encoding", "chunked")],
    }),
    ("a length set", {"content": b"xy", "headers": [("Content-Length", "2")]}),
    ("a default overridden", {"content": b"x", "headers": [("ACCEPT-ENCODING", "identity")]}),
    ("a query (httpx2's own path)", {"content": b"x", "params": {"q": "1"}}),
    ("a JSON body (httpx2's own path)", {"json": {"a": 1}}),
    ("headers as a mapping (httpx2's own path)", {"headers": {"x-a": "1"}}),
]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "arguments"), CALLS, ids=[case for case, _ in CALLS])
@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("url", [f"{BASE}/chat/completions", "/models"])
async def test_the_request_is_the_one_httpx2_builds(
    client: LinkClient, case: str, arguments: dict[str, Any], method: str, url: str
) -> None:
    arguments = {"headers": SDK_HEADERS, **arguments}
    for _ in range(2):  # the second time with the URL parsed the first
        lean = client.build_request(method, url, **arguments)
        reference = httpx2.AsyncClient.build_request(client, method, url, **arguments)
        assert fields(lean) == fields(reference), case


@pytest.mark.anyio
async def test_a_new_base_url_or_client_header_is_used_at_once(client: LinkClient) -> None:
    client.build_request("POST", "/models", headers=[], content=b"x")
    client.base_url = httpx2.URL("http://127.0.0.1:9/v2")
    client.headers["x-client"] = "c"
    request = client.build_request("POST", "/models", headers=[], content=b"x")
    assert str(request.url) == "http://127.0.0.1:9/v2/models"
    assert request.headers["x-client"] == "c"


@pytest.mark.anyio
async def test_client_cookies_go_through_httpx2(client: LinkClient) -> None:
    client.cookies.set("session", "s", domain="127.0.0.1")
    request = client.build_request("POST", f"{BASE}/x", headers=[], content=b"x")
    assert request.headers["cookie"] == "session=s"
