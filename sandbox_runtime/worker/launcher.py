"""Starting one Deno + Pyodide process: command line, permissions, environment, pipes, limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import rlm_repl

from ..errors import SandboxStartError
from .settings import WorkerSettings

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
JS_DIR = PACKAGE_DIR / "js"
GUEST_DIR = PACKAGE_DIR / "guest"
HOST_SCRIPT = JS_DIR / "host.mjs"
#: The REPL model code sees, the one file every environment runs; the guest imports it.
REPL_SCRIPT = Path(rlm_repl.__file__).resolve()
WASM_PAGE = 65536
PIPE_STREAM_LIMIT = 2**20


@dataclass(frozen=True, slots=True)
class Launched:
    """A started process and the supervisor's ends of its three pipes."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    interrupt_fd: int
    read_transport: asyncio.BaseTransport

    def close_pipes(self) -> None:
        """Close the supervisor's ends (idempotent).

        The read transport is closed explicitly: the stdlib loop closes it at end of stream,
        but uvloop keeps a read pipe whose peer died open (and its fd) until it is closed.
        """
        self.writer.close()
        self.read_transport.close()
        with contextlib.suppress(OSError):
            os.close(self.interrupt_fd)


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -n` works here (needs root or user namespaces); checked once."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        done = subprocess.run(
            [unshare, "-n", "--", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _network_prefix(settings: WorkerSettings) -> list[str]:
    if settings.network_namespace == "off":
        return []
    if network_namespace_available():
        return [shutil.which("unshare") or "unshare", "-n", "--"]
    if settings.network_namespace == "require":
        raise SandboxStartError("network_namespace='require' but `unshare -n` is not available")
    return []


def deno_argv(
    settings: WorkerSettings,
    *,
    fd_in: int,
    fd_out: int,
    fd_int: int,
    memory_bytes: int,
    snapshot_path: Path | None,
    make_snapshot: bool,
) -> list[str]:
    """The full command line: read access to Pyodide, our scripts and pipes; nothing else."""
    readable = [str(settings.pyodide_dir), str(JS_DIR), str(GUEST_DIR), str(REPL_SCRIPT)]
    readable += [f"/dev/fd/{fd_in}", f"/dev/fd/{fd_int}"]
    if snapshot_path is not None:
        readable.append(str(snapshot_path))
    config = {
        "pyodide_dir": str(settings.pyodide_dir),
        "guest_dir": str(GUEST_DIR),
        "repl_path": str(REPL_SCRIPT),
        "snapshot_path": str(snapshot_path) if snapshot_path else None,
        "make_snapshot": make_snapshot,
        "fd_in": fd_in,
        "fd_out": fd_out,
        "fd_int": fd_int,
        "state_bytes": settings.state_bytes,
    }
    pages = max(1, memory_bytes // WASM_PAGE)
    return [
        *_network_prefix(settings),
        str(settings.deno_path),
        "run",
        "--no-prompt",
        "--no-config",
        "--no-lock",
        "--no-remote",
        "--no-npm",
        f"--allow-read={','.join(readable)}",
        f"--allow-write=/dev/fd/{fd_out}",
        "--deny-net",
        "--deny-env",
        "--deny-run",
        "--deny-ffi",
        "--deny-sys",
        f"--v8-flags=--wasm-max-mem-pages={pages}",
        str(HOST_SCRIPT),
        json.dumps(config),
    ]


def scrubbed_env(settings: WorkerSettings) -> dict[str, str]:
    """PATH and what Deno itself needs; nothing of the supervisor's environment."""
    deno_dir = settings.cache_dir / "deno"
    deno_dir.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/bin:/bin",
        "DENO_DIR": str(deno_dir),
        "DENO_NO_UPDATE_CHECK": "1",
        "NO_COLOR": "1",
    }


async def launch(
    settings: WorkerSettings,
    *,
    memory_bytes: int,
    snapshot_path: Path | None,
    make_snapshot: bool = False,
) -> Launched:
    """Start a sandbox process; the caller waits for its first frame."""
    loop = asyncio.get_running_loop()
    child_in, parent_out = os.pipe()
    parent_in, child_out = os.pipe()
    child_int, parent_int = os.pipe()
    child_fds = (child_in, child_out, child_int)
    try:
        argv = deno_argv(
            settings,
            fd_in=child_in,
            fd_out=child_out,
            fd_int=child_int,
            memory_bytes=memory_bytes,
            snapshot_path=snapshot_path,
            make_snapshot=make_snapshot,
        )
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=scrubbed_env(settings),
            cwd="/",
            pass_fds=child_fds,
            start_new_session=True,
        )
    except OSError as exc:
        for fd in (*child_fds, parent_in, parent_out, parent_int):
            os.close(fd)
        raise SandboxStartError(f"cannot start {settings.deno_path}: {exc}") from exc
    for fd in child_fds:
        os.close(fd)
    _limit_resources(process.pid, settings)
    os.set_blocking(parent_int, False)
    read_file = os.fdopen(parent_in, "rb", buffering=0)
    write_file = os.fdopen(parent_out, "wb", buffering=0)
    read_transport: asyncio.BaseTransport | None = None
    try:
        reader = asyncio.StreamReader(limit=PIPE_STREAM_LIMIT)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), read_file
        )
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, write_file
        )
    except BaseException:
        # Nothing owns the process or the pipes yet: end both here, or they leak.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        if read_transport is not None:
            read_transport.close()
        for handle in (read_file, write_file):
            handle.close()
        os.close(parent_int)
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Launched(process, reader, writer, parent_int, read_transport)


def _limit_resources(pid: int, settings: WorkerSettings) -> None:
    limits = {
        resource.RLIMIT_NOFILE: settings.max_open_files,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        try:
            resource.prlimit(pid, which, (value, value))
        except (OSError, ValueError) as exc:
            logger.warning(
                "sandbox rlimit not applied", extra={"pid": pid, "limit": which, "error": str(exc)}
            )
