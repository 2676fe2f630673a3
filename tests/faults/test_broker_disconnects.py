"""A client that hangs up half-way through its body is not a server error: no traceback,
no 500 in the metrics, counted apart as a client disconnect."""

from __future__ import annotations

import asyncio
import logging
import socket

import httpx2
import pytest

from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer, wait_until

pytestmark = pytest.mark.anyio


def _send_half_a_body(url: str, path: str, token: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"prompt": "half a'
        )
        # Hang up once the server has started reading the body.


def _metric_lines(url: str, name: str) -> list[str]:
    text = httpx2.get(f"{url}/metrics").text
    return [line for line in text.splitlines() if line.startswith(name)]


async def test_a_client_hanging_up_mid_body_is_counted_apart_without_a_traceback(
    broker_server: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = broker_server.url
    async with tenant_and_session(url, broker_server.admin_token) as (tenant, session):
        caplog.set_level(logging.DEBUG, logger="broker")
        for path, token in (
            ("/enqueue", session.token),
            ("/respond", tenant.token),
            ("/tenants", broker_server.admin_token),
        ):
            await asyncio.to_thread(_send_half_a_body, url, path, token)

        def counted() -> bool:
            lines = _metric_lines(url, "rlm_broker_client_disconnects_total")
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines) == 3

        await wait_until(counted, timeout_s=10)
    answers = _metric_lines(url, "rlm_broker_http_requests_total")
    assert not [line for line in answers if 'status="5' in line or 'status="499"' in line]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text
    assert [r for r in caplog.records if "disconnected" in r.getMessage()]
