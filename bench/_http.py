"""A minimal keep-alive HTTP/1.1 client over asyncio streams, for load generation only.

The benchmark's own client must cost less than the server it measures: a general client
(httpx2) spends ~0.5 ms of CPU per request in the same 2-core box as the broker. This one
speaks just enough HTTP/1.1 (Content-Length bodies, keep-alive) for the broker's replies.
Every measurement in a run uses it alike (floor, pollers, waiters), so ratios are fair.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class RawConnection:
    """One keep-alive connection; requests on it run one at a time."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self._host, self._port = host, port
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\n{self._auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self._writer.write(head.encode() + payload)
        status_line = await self._reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self._reader.readexactly(length)
        return status, json.loads(data) if data else None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._writer = None
