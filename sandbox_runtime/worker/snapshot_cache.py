"""The Pyodide memory snapshot: made once by a sandbox process, kept under the cache dir.

A snapshot is only valid for the exact Pyodide build and for the guest code imported into
it, so its file name carries the Pyodide version and a digest of `pyodide.asm.wasm`'s size,
the host script, the guest sources and where they are. Deno never writes: the process that
makes the snapshot sends its bytes over the pipe, and this module writes them (atomically,
under a file lock so concurrent supervisors make it once).
"""

from __future__ import annotations

import asyncio
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
    if path.exists():
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
    logger.info(
        "pyodide snapshot made",
        extra={
            "path": str(path),
            "bytes": len(frame.payload),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
