"""Contexts held by content hash, so the remote placement sends a context once per replica.

`PUT /contexts/{sha256}` stores a context's JSON bytes under the sha256 of those bytes;
`POST /execute` then names it in `contexts` instead of carrying it (and the namespace blob
leaves it out). The cache is bounded by total bytes and by entry count and forgets the least
recently used entry first; a call naming a hash it does not hold is answered 409
`context_unknown` before any sandbox is taken, and the client uploads it again.

Trust: every holder of the runtime token shares this cache. An entry is stored only if its
bytes hash to its name, so nobody can poison another's entry, and there is no route that
lists or reads entries: the only way to read one is to name its hash, and the hash is the
sha256 of the content. Possession of the hash is taken as possession of the content (a
context whose hash could be guessed is one whose content could be guessed).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import pydantic_core
from prometheus_client import Counter

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.runtime_models import CONTEXT_HASH_PATTERN
from sandbox_runtime.service.metrics import Metrics

_HASH = re.compile(CONTEXT_HASH_PATTERN)


def check_hash(name: str) -> str:
    """`name` if it is a lowercase hex sha256, else 400 `bad_request`."""
    if not _HASH.fullmatch(name):
        raise ApiError(
            400,
            ErrorCode.BAD_REQUEST,
            "a context is named by the lowercase hex sha256 of its bytes",
        )
    return name


@dataclass(frozen=True, slots=True)
class CachedContext:
    """A context as the sandbox takes it: a JSON string's text as UTF-8 (`kind` "str": the
    sandbox skips a JSON decode of tens of MB on every call), else its JSON bytes."""

    kind: Literal["str", "json"]
    payload: bytes


def verify(name: str, content: bytes) -> CachedContext:
    """Refuse content that does not hash to `name` (400) or is not a JSON string, array or
    object (422, as the session route does). CPU-bound on big contexts: run it in a thread."""
    if hashlib.sha256(content).hexdigest() != name:
        raise ApiError(
            400,
            ErrorCode.CONTEXT_HASH_MISMATCH,
            "the body's sha256 is not the hash it was put under (a context is stored only "
            "under the hash of its own bytes)",
        )
    try:
        value = pydantic_core.from_json(content)
    except ValueError as exc:
        raise ApiError(400, ErrorCode.BAD_REQUEST, f"the context is not JSON: {exc}") from exc
    if isinstance(value, str):
        return CachedContext("str", value.encode("utf-8"))
    if not isinstance(value, list | dict):
        raise ApiError(
            422, ErrorCode.INVALID_BODY, "the context must be a JSON string, array or object"
        )
    return CachedContext("json", content)


class ContextCache:
    """An LRU map sha256 -> `CachedContext` within `max_bytes` (of payloads) and `max_entries`."""

    def __init__(self, *, max_bytes: int, max_entries: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedContext] = OrderedDict()
        self.total_bytes = 0
        r = metrics.registry
        self.uploads = Counter(
            "rlm_sandbox_context_uploads", "Contexts stored by PUT /contexts.", registry=r
        )
        self.misses = Counter(
            "rlm_sandbox_context_misses",
            "Context hashes POST /execute named that this replica did not hold (409).",
            registry=r,
        )
        self.evictions = Counter(
            "rlm_sandbox_context_evictions", "Contexts dropped to stay within bounds.", registry=r
        )
        metrics.gauge(
            "rlm_sandbox_context_cache_bytes", "Bytes of cached contexts.", lambda: self.total_bytes
        )
        metrics.gauge(
            "rlm_sandbox_context_cache_entries", "Cached contexts.", lambda: len(self._entries)
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def touch(self, name: str) -> bool:
        """Whether `name` is held, marking it recently used if so: a client asks before it
        uploads what a call lacks, and what it was told is held must not be what the upload
        then evicts."""
        if name not in self._entries:
            return False
        self._entries.move_to_end(name)
        return True

    async def put(self, name: str, content: bytes) -> bool:
        """Store `content` under `name` after `verify`; False if it was held already."""
        if len(content) > self.max_bytes:
            raise ApiError(
                413,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the context is {len(content)} bytes, more than the whole context cache "
                f"holds ({self.max_bytes} bytes, RLM_SANDBOX_CONTEXT_CACHE_BYTES)",
            )
        entry = await asyncio.to_thread(verify, name, content)
        if name in self._entries:
            self._entries.move_to_end(name)
            return False
        self._entries[name] = entry
        self.total_bytes += len(entry.payload)
        self.uploads.inc()
        self._evict(keep=name)
        return True

    def resolve(self, names: Iterable[str]) -> list[CachedContext]:
        """The contents of `names`, in order (each marked recently used), or 409
        `context_unknown` naming the hashes this replica does not hold."""
        wanted = list(names)
        missing = [name for name in wanted if name not in self._entries]
        if missing:
            self.misses.inc(len(missing))
            raise ApiError(
                409,
                ErrorCode.CONTEXT_UNKNOWN,
                f"this runtime does not hold the context(s) {', '.join(missing)}: upload them "
                "with PUT /contexts/{sha256} and send the call again",
            )
        for name in wanted:
            self._entries.move_to_end(name)
        return [self._entries[name] for name in wanted]

    def _evict(self, keep: str) -> None:
        """Drop the least recently used entries (never `keep`) until within both bounds.
        A running execution holds its own reference to the bytes it resolved."""
        while self.total_bytes > self.max_bytes or len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self.total_bytes -= len(self._entries.pop(oldest).payload)
            self.evictions.inc()
