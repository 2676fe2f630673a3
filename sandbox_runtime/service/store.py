"""Where hibernated sessions wait: their namespace blobs, in memory or in a directory."""

from __future__ import annotations

import abc
import asyncio
import os
import re
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class HibernationStore(abc.ABC):
    """Blobs by session id. A blob is written once per hibernation and read once per restore."""

    @abc.abstractmethod
    async def put(self, session_id: str, blob: bytes) -> None: ...

    @abc.abstractmethod
    async def get(self, session_id: str) -> bytes | None:
        """The blob, or None if there is none."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @property
    @abc.abstractmethod
    def total_bytes(self) -> int:
        """Bytes held by all blobs."""


class MemoryStore(HibernationStore):
    """Blobs kept in this process's memory."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    async def put(self, session_id: str, blob: bytes) -> None:
        self._blobs[session_id] = blob

    async def get(self, session_id: str) -> bytes | None:
        return self._blobs.get(session_id)

    async def delete(self, session_id: str) -> None:
        self._blobs.pop(session_id, None)

    @property
    def total_bytes(self) -> int:
        return sum(len(blob) for blob in self._blobs.values())


class DirectoryStore(HibernationStore):
    """Blobs written to files in `directory` (one file per session, replaced atomically)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._sizes: dict[str, int] = {}

    def _path(self, session_id: str) -> Path:
        if not _SAFE_ID.match(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self._directory / f"{session_id}.blob"

    async def put(self, session_id: str, blob: bytes) -> None:
        path = self._path(session_id)
        await asyncio.to_thread(_write_atomically, path, blob)
        self._sizes[session_id] = len(blob)

    async def get(self, session_id: str) -> bytes | None:
        path = self._path(session_id)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, session_id: str) -> None:
        self._sizes.pop(session_id, None)
        await asyncio.to_thread(self._path(session_id).unlink, True)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())


def _write_atomically(path: Path, blob: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def make_store(directory: Path | None) -> HibernationStore:
    """A directory store if `directory` is set, else a memory store."""
    return DirectoryStore(directory) if directory is not None else MemoryStore()
