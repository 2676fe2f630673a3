"""The Pyodide memory snapshot: made once by a sandbox process, kept under the cache dir.

A snapshot is only valid for the exact Pyodide build and for the guest code imported into
it, so its file name carries the Pyodide version and a digest of `pyodide.asm.wasm`'s size,
the host script, the guest sources and where they are. Deno never writes: the process that
makes the snapshot sends its bytes over the pipe, and this module writes them (atomically,
under a file lock so concurrent supervisors make it once).

Every new key leaves the old snapshots behind (~30 MB each: an upgrade, an edited guest
script, another copy of the project sharing the directory), so making one also prunes the
directory down to the `snapshot_cache_keep` most recently used. A snapshot's last use is its
access time, set when a sandbox is started from it (its modification time stays: it is part
of the key under which `snapshot_memory` keeps the snapshot's memory file).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TextIO

from ..errors import SandboxStartError
from .framing import read_frame
from .launcher import GUEST_DIR, HOST_SCRIPT, JS_DIR, REPL_SCRIPT, launch
from .settings import WorkerSettings

logger = logging.getLogger(__name__)

_locks: dict[Path, asyncio.Lock] = {}

#: A snapshot's access time is moved at most this often (a system call per start otherwise).
_MARK_USED_EVERY_S = 60.0
#: Half-written snapshots (`*.tmp<pid>`), and lock files without a snapshot, older than this
#: were left by a maker that died (one is made in seconds, within `start_timeout_s`).
_ABANDONED_AFTER_S = 3600.0


def pyodide_version(settings: WorkerSettings) -> str:
    package = json.loads((settings.pyodide_dir / "package.json").read_text())
    return str(package["version"])


def snapshot_path(settings: WorkerSettings) -> Path:
    digest = hashlib.sha256()
    digest.update(str((settings.pyodide_dir / "pyodide.asm.wasm").stat().st_size).encode())
    # rlm_repl.py is imported into the snapshot too: a changed REPL needs a new snapshot.
    sources = [HOST_SCRIPT, *sorted(JS_DIR.glob("*.mjs")), *sorted(GUEST_DIR.glob("*.py"))]
    for source in [*sources, REPL_SCRIPT]:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    # Where Pyodide and our scripts are loaded from (a copy of the project elsewhere, sharing
    # this cache directory, makes its own snapshot).
    for location in (settings.pyodide_dir, JS_DIR):
        digest.update(str(location).encode())
    name = f"pyodide-{pyodide_version(settings)}-{digest.hexdigest()[:16]}.snapshot"
    return settings.cache_dir / name


async def ensure_snapshot(settings: WorkerSettings) -> Path:
    """The snapshot file for these settings, made now if missing."""
    path = snapshot_path(settings)
    if _in_place(path):
        return path
    lock = _locks.setdefault(path, asyncio.Lock())
    async with lock:
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = await asyncio.to_thread(_acquire_file_lock, path.with_suffix(".lock"))
        try:
            if not path.exists():
                await _make(settings, path)
        finally:
            lock_file.close()  # releases the flock
    return path


def _in_place(path: Path) -> bool:
    """Whether the snapshot `path` is there; if it is, its use is recorded (its access time;
    best effort: a cache directory this process may not write is used as it is)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    if time.time() - info.st_atime > _MARK_USED_EVERY_S:
        with contextlib.suppress(OSError):
            os.utime(path, ns=(time.time_ns(), info.st_mtime_ns))
    return True


def _last_used(path: Path) -> float | None:
    try:
        return path.stat().st_atime
    except FileNotFoundError:  # removed meanwhile (another supervisor pruning)
        return None


def prune(cache_dir: Path, keep: int, current: Path) -> list[Path]:
    """Remove from `cache_dir` all snapshots but the `keep` most recently used (`current`
    always kept) with their lock files, what makers that died left (half-written snapshots,
    lock files without a snapshot), and the module caches an earlier version kept beside its
    snapshots. The files removed."""
    others = []
    for path in cache_dir.glob("pyodide-*.snapshot"):
        last_used = _last_used(path)
        if last_used is not None and path != current:
            others.append((last_used, path))
    dropped = [path for _, path in sorted(others, reverse=True)[keep - 1 :]]
    stale = [*dropped, *(path.with_suffix(".lock") for path in dropped)]
    stale += cache_dir.glob("pyodide-*.deno-modules")
    now = time.time()
    orphan_locks = (
        lock
        for lock in cache_dir.glob("pyodide-*.lock")
        if not lock.with_suffix(".snapshot").exists()
    )
    for path in [*cache_dir.glob("pyodide-*.tmp*"), *orphan_locks]:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _ABANDONED_AFTER_S:
                stale.append(path)
    removed = []
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(
                "cannot remove an old snapshot file", extra={"path": str(path), "error": str(exc)}
            )
            continue
        removed.append(path)
    return removed


def _acquire_file_lock(lock_path: Path) -> TextIO:
    handle = lock_path.open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


async def _make(settings: WorkerSettings, path: Path) -> None:
    started = time.perf_counter()
    launched = await launch(
        settings, memory_bytes=settings.memory_bytes, snapshot_path=None, make_snapshot=True
    )
    try:
        frame = await asyncio.wait_for(
            read_frame(launched.reader, settings.max_frame_bytes), settings.start_timeout_s
        )
    except TimeoutError as exc:
        raise SandboxStartError("making the Pyodide snapshot timed out") from exc
    finally:
        if launched.process.returncode is None:
            launched.process.kill()
        await launched.process.wait()
        launched.close()
    if frame is None or frame.header.get("op") != "snapshot_made" or len(frame.payload) < 2**20:
        detail = b""
        if launched.process.stderr is not None:
            detail = (await launched.process.stderr.read())[-2000:]
        raise SandboxStartError(
            "the sandbox process did not produce a memory snapshot: "
            + detail.decode("utf-8", "replace").strip()
        )
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    await asyncio.to_thread(tmp.write_bytes, frame.payload)
    os.replace(tmp, path)
    removed = await asyncio.to_thread(prune, path.parent, settings.snapshot_cache_keep, path)
    logger.info(
        "pyodide snapshot made",
        extra={
            "path": str(path),
            "bytes": len(frame.payload),
            "seconds": round(time.perf_counter() - started, 3),
            "old_files_removed": len(removed),
        },
    )
