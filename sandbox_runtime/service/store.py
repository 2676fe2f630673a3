"""Where hibernated sessions wait: their namespace blobs, in memory within a budget, and past
it in files of a private directory, within a budget of their own.

A blob over the per-session bound, or one neither budget has room for, is refused
(`HibernationRefused`): the session stays live instead, so the runtime's memory is bounded by
`memory_bytes` plus what is being written, never by the number of hibernated sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class HibernationRefused(Exception):
    """The store will not keep this blob (too large, or no budget left); nothing was stored."""


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Bytes of one blob, of all blobs in memory, and of all spilled files."""

    max_blob_bytes: int
    memory_bytes: int
    disk_bytes: int


class HibernationStore:
    """Blobs by session id. A blob is written once per hibernation and read once per restore.

    Spilled files live in a directory made on the first spill inside `spill_root`: its own
    per process (mode 0700, from `mkdtemp`), files mode 0600 created exclusively and never
    through a symlink, the directory removed by `aclose`.
    """

    def __init__(self, limits: StoreLimits, spill_root: Path) -> None:
        self.limits = limits
        self._spill_root = spill_root
        self._directory: Path | None = None
        self._memory: dict[str, bytes] = {}
        self._files: dict[str, int] = {}
        self.memory_bytes = 0
        self.disk_bytes = 0

    @property
    def total_bytes(self) -> int:
        """Bytes held by all blobs, in memory and in files."""
        return self.memory_bytes + self.disk_bytes

    @property
    def directory(self) -> Path | None:
        """The spill directory, once something was spilled."""
        return self._directory

    async def put(self, session_id: str, blob: bytes) -> None:
        """Keep `blob` as the session's (replacing its earlier one), or raise
        `HibernationRefused` and keep the earlier one."""
        _check_id(session_id)
        size = len(blob)
        if size > self.limits.max_blob_bytes:
            raise HibernationRefused(
                f"the blob is {size} bytes, over the per-session limit of "
                f"{self.limits.max_blob_bytes} (RLM_SANDBOX_HIBERNATION_MAX_BLOB_BYTES)"
            )
        in_memory = self.memory_bytes - len(self._memory.get(session_id, b""))
        on_disk = self.disk_bytes - self._files.get(session_id, 0)
        if in_memory + size <= self.limits.memory_bytes:
            self._drop_file_entry(session_id)
            self._memory[session_id] = blob
            self.memory_bytes = in_memory + size
            await self._unlink(session_id)
        elif on_disk + size <= self.limits.disk_bytes:
            # Counted before the write, so that puts running meanwhile see the room taken
            # (the session's old file, if any, stays until the new one is renamed over it).
            old = self._files.get(session_id, 0)
            reserved = max(size, old)
            self._files[session_id] = reserved
            self.disk_bytes += reserved - old
            try:
                # Made here, on the loop (once, a quick mkdir): puts on threads share it.
                directory = self._spill_directory()
                await asyncio.to_thread(_write, directory, session_id, blob)
            except BaseException as exc:
                self.disk_bytes -= reserved - old
                if old:
                    self._files[session_id] = old
                else:
                    del self._files[session_id]
                if isinstance(exc, OSError):
                    raise HibernationRefused(f"the blob could not be spilled: {exc}") from exc
                raise
            self._files[session_id] = size
            self.disk_bytes += size - reserved
            self._drop_memory_entry(session_id)
        else:
            raise HibernationRefused(
                f"no room for a blob of {size} bytes: {in_memory} of "
                f"{self.limits.memory_bytes} bytes in memory and {on_disk} of "
                f"{self.limits.disk_bytes} on disk are taken "
                "(RLM_SANDBOX_HIBERNATION_MEMORY_BYTES, RLM_SANDBOX_HIBERNATION_DISK_BYTES)"
            )

    async def get(self, session_id: str) -> bytes | None:
        """The blob, or None if there is none."""
        _check_id(session_id)
        blob = self._memory.get(session_id)
        if blob is not None or session_id not in self._files or self._directory is None:
            return blob
        try:
            return await asyncio.to_thread(_path(self._directory, session_id).read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, session_id: str) -> None:
        _check_id(session_id)
        self._drop_memory_entry(session_id)
        if self._drop_file_entry(session_id):
            await self._unlink(session_id)

    async def aclose(self) -> None:
        """Forget every blob and remove the spill directory."""
        self._memory.clear()
        self._files.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._directory is not None:
            await asyncio.to_thread(shutil.rmtree, self._directory, True)
            self._directory = None

    # --- internals -----------------------------------------------------------------------------

    def _drop_memory_entry(self, session_id: str) -> None:
        blob = self._memory.pop(session_id, None)
        if blob is not None:
            self.memory_bytes -= len(blob)

    def _drop_file_entry(self, session_id: str) -> bool:
        size = self._files.pop(session_id, None)
        if size is None:
            return False
        self.disk_bytes -= size
        return True

    def _spill_directory(self) -> Path:
        if self._directory is None:
            self._spill_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._directory = Path(tempfile.mkdtemp(prefix="hibernation-", dir=self._spill_root))
        return self._directory

    async def _unlink(self, session_id: str) -> None:
        if self._directory is not None:
            await asyncio.to_thread(_path(self._directory, session_id).unlink, True)


def _write(directory: Path, session_id: str, blob: bytes) -> None:
    """Write the file under a fresh name, then rename it over the session's old one.

    No fsync: the files do not outlive the process (the directory is removed at stop).
    """
    tmp = directory / f"{session_id}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, _FILE_FLAGS, 0o600)
    try:
        with open(fd, "wb", closefd=True) as handle:
            handle.write(blob)
        os.replace(tmp, _path(directory, session_id))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _path(directory: Path, session_id: str) -> Path:
    return directory / f"{session_id}.blob"


def _check_id(session_id: str) -> None:
    if not _SAFE_ID.match(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
