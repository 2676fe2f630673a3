"""The poller's HTTP transport (RLM_POLLER_HTTP_TRANSPORT): the lean link by default, httpx2
where a proxy is needed. Told apart by behaviour: httpx2 honours HTTP_PROXY, the link never."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from host_poller.poller import PollerSettings
from tests.support.servers import BrokerServer, loopback_server
from tests.test_poller import make_poller, poller_settings


class RecordingProxy:
    """An HTTP server on loopback that records each request line and answers an empty
    `/pending` batch: what a forward proxy in front of the broker would see."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self.request_lines.append(line.decode("latin-1").strip())
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                body = json.dumps({"requests": []}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RecordingProxy]:
        async with loopback_server(self._serve) as self.url:
            yield self


@pytest.mark.anyio
@pytest.mark.parametrize(("transport", "through_proxy"), [("link", False), ("httpx", True)])
async def test_poller_talks_to_the_broker_over_the_configured_transport(
    broker_server: BrokerServer,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    through_proxy: bool,
) -> None:
    async with RecordingProxy().running() as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        settings = poller_settings(broker_server, poller_http_transport=transport)
        async with make_poller(settings, "http://127.0.0.1:9") as poller:
            assert await poller.run_once() == 0
    via_proxy = [line for line in proxy.request_lines if broker_server.url in line]
    if through_proxy:
        assert any(line.startswith("GET ") and "/pending" in line for line in via_proxy)
    else:
        assert proxy.request_lines == []


def test_the_lean_link_is_the_default() -> None:
    settings = PollerSettings(admin_token="t")
    assert settings.poller_http_transport == "link"


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="poller_http_transport"):
        PollerSettings(admin_token="t", poller_http_transport="h2")
