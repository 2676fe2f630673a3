"""Frames on the pipes between supervisor and sandbox: two big-endian u32 (header length,
payload length), a JSON object header, then raw payload bytes."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import SandboxProtocolError

_PREFIX = struct.Struct(">II")
#: Ceiling on a frame's JSON header from a sandbox, whatever `max_bytes` allows: checked on the
#: 8-byte prefix, so a forged header is refused before any of it is read. The guest keeps its
#: replies under it (`rlm_guest.runtime.MAX_REPLY_BYTES`, with room for the `seq` that host.mjs
#: adds), so only a forged frame meets it. Large data (a namespace pickle) travels as the
#: payload, bounded by max_bytes.
MAX_HEADER_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class Frame:
    header: dict[str, Any]
    payload: bytes = b""


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(len(body), len(payload)) + body + payload


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> Frame | None:
    """The next frame, or None at a clean end of stream.

    The header is bounded by `min(max_bytes, max_header_bytes)`, the payload by `max_bytes`;
    a frame over either is a `SandboxProtocolError` raised before its body is read.
    """
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise SandboxProtocolError("stream ended inside a frame prefix") from exc
        return None
    header_len, payload_len = _PREFIX.unpack(prefix)
    header_cap = min(max_bytes, max_header_bytes)
    if header_len > header_cap:
        raise SandboxProtocolError(
            f"frame header of {header_len} bytes is over the limit of {header_cap} bytes"
        )
    if payload_len > max_bytes:
        raise SandboxProtocolError(
            f"frame payload of {payload_len} bytes is over the limit of {max_bytes} bytes"
        )
    try:
        header_bytes = await reader.readexactly(header_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as exc:
        raise SandboxProtocolError("stream ended inside a frame") from exc
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise SandboxProtocolError("frame header is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise SandboxProtocolError("frame header is not an object with an 'op'")
    return Frame(header, payload)
