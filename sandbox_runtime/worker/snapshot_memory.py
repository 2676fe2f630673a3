"""The memory snapshot held once, in a sealed memory file that every sandbox maps.

A sandbox restored from the snapshot used to get its ~30 MB over its pipe and copy them into
its own WebAssembly memory: private pages in every process, and a copy of the bytes kept in
the runtime's. Now the runtime keeps each version of the snapshot in one memory file (Linux
`memfd`), sealed against writing, shrinking and growing, and passes a descriptor of it to each
sandbox it starts. Through the C library (Deno's FFI permission for that library alone,
revoked before any guest code runs), the sandbox reads the snapshot's header from it and maps
the image over its WebAssembly memory, private and copy-on-write (`pyodide_load.mjs`): the
pages a session has not written are the same physical pages in every sandbox, counted once
among them (PSS), and what a session writes is its own, as before. The seals hold for every
process whatever its uid: no sandbox can change what the others map. Without the mapping
(`RLM_SANDBOX_MAP_SNAPSHOT` off, or no C library found), the snapshot's bytes, read back from
the file, go over the pipe as before.

Layout: Pyodide's snapshot is a header (its second little-endian u32 is the header's length)
followed by the memory's image. The file holds the header in its first page and the image
from the next page boundary on (a mapping starts at a page of the file); the image's zero
pages are left unwritten, holes that read as zero and take no memory.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path

from ..errors import SandboxStartError

PAGE = 4096
#: How a snapshot file shows in a process's mappings and descriptors (`/memfd:rlm-<file name>`).
MAPPED_NAME_PREFIX = "/memfd:rlm-"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_ZERO_PAGE = bytes(PAGE)

#: (path, size, modification time) -> descriptor: one version held at a time.
_held: dict[tuple[Path, int, int], int] = {}
_lock = threading.Lock()


def image_offset(header_bytes: int) -> int:
    """Where the image starts in the file: the first page boundary past the header."""
    return max(PAGE, -(-header_bytes // PAGE) * PAGE)


def snapshot_memory(path: Path) -> int:
    """A descriptor of the sealed memory file holding the snapshot at `path`, the caller's to
    close (a new version of the file closes this process's own). The file is made once per
    version (its size and modification time); a snapshot pruned from the cache directory
    since it was found (`snapshot_cache.prune`) is served from the file kept for its name
    (its name is its key). Reads the snapshot (~30 MB) the first time: not on an event loop."""
    with _lock:
        try:
            info = path.stat()
        except FileNotFoundError:
            kept = next((fd for key, fd in _held.items() if key[0] == path), None)
            if kept is None:
                raise
            return os.dup(kept)
        key = (path, info.st_size, info.st_mtime_ns)
        fd = _held.get(key)
        if fd is None:
            fd = _sealed_copy(path.read_bytes(), path.name)
            for old in _held.values():  # one snapshot in use at a time
                os.close(old)
            _held.clear()
            _held[key] = fd
        return os.dup(fd)


def held_bytes() -> int:
    """Memory the snapshot file this process holds takes (its pages written): once for every
    sandbox, in no process's PSS but where a sandbox maps it."""
    with _lock:
        return sum(os.fstat(fd).st_blocks * 512 for fd in _held.values())


def snapshot_bytes(fd: int) -> bytes:
    """The snapshot as Pyodide made it (header, then image), read back from its memory file."""
    first = os.pread(fd, PAGE, 0)
    (header_bytes,) = struct.unpack_from("<I", first, 4)
    start = image_offset(header_bytes)
    return first[:header_bytes] + os.pread(fd, os.fstat(fd).st_size - start, start)


def _sealed_copy(snapshot: bytes, name: str) -> int:
    if len(snapshot) < 8:
        raise SandboxStartError(f"{name} is not a Pyodide memory snapshot")
    (header_bytes,) = struct.unpack_from("<I", snapshot, 4)
    if not 8 <= header_bytes <= min(len(snapshot), PAGE):
        raise SandboxStartError(f"{name} is not a Pyodide memory snapshot (its header length)")
    image = memoryview(snapshot)[header_bytes:]
    start = image_offset(header_bytes)
    memfd_name = MAPPED_NAME_PREFIX.removeprefix("/memfd:") + name
    fd = os.memfd_create(memfd_name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, start + len(image))
        os.pwrite(fd, snapshot[:header_bytes], 0)
        for at in range(0, len(image), PAGE):
            page = image[at : at + PAGE]
            if page != _ZERO_PAGE[: len(page)]:
                os.pwrite(fd, page, start + at)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd
