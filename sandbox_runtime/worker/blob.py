"""The hibernation blob: a magic prefix and the zlib-compressed namespace pickle.

The supervisor only compresses and decompresses; the pickle itself is made and read inside the
sandbox, so a blob sent back by a client (stateless execute) is never unpickled out here.
"""

from __future__ import annotations

import zlib

from ..errors import SandboxBlobError

MAGIC = b"RLMNS1\x00"
#: Output per step when a blob is only measured: memory stays at this, whatever it inflates to.
_MEASURE_CHUNK = 2**20


def pack(raw: bytes, level: int) -> bytes:
    return MAGIC + zlib.compress(raw, level)


def unpack(blob: bytes, max_bytes: int) -> bytes:
    """The raw namespace pickle; refuses other formats and anything decompressing past max."""
    if not blob.startswith(MAGIC):
        raise SandboxBlobError("not a sandbox namespace blob (bad magic)")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob[len(MAGIC) :], max_bytes)
    except zlib.error as exc:
        raise SandboxBlobError(f"corrupt namespace blob: {exc}") from exc
    if inflater.unconsumed_tail:
        raise SandboxBlobError(f"namespace blob decompresses past {max_bytes} bytes")
    if not inflater.eof:
        raise SandboxBlobError("truncated namespace blob")
    return raw


def inflated_size(blob: bytes, max_bytes: int) -> int | None:
    """The size `unpack` would return, or None as soon as it passes `max_bytes`.

    Decompresses in steps of `_MEASURE_CHUNK` and keeps none of it, so a decompression bomb
    costs one chunk of memory. Raises `SandboxBlobError` as `unpack` does for a bad blob.
    """
    if not blob.startswith(MAGIC):
        raise SandboxBlobError("not a sandbox namespace blob (bad magic)")
    inflater = zlib.decompressobj()
    data = blob[len(MAGIC) :]
    size = 0
    while not inflater.eof:
        try:
            out = inflater.decompress(data, _MEASURE_CHUNK)
        except zlib.error as exc:
            raise SandboxBlobError(f"corrupt namespace blob: {exc}") from exc
        size += len(out)
        if size > max_bytes:
            return None
        data = inflater.unconsumed_tail
        if not data and not out:
            raise SandboxBlobError("truncated namespace blob")
    return size
