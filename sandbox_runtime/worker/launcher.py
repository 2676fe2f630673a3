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
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import rlm_repl

from ..errors import SandboxStartError
from . import confinement, page_merging
from .confinement import Wrapped, network_namespace_works
from .framing import encode_frame
from .settings import WorkerSettings
from .snapshot_memory import snapshot_bytes, snapshot_memory

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
JS_DIR = PACKAGE_DIR / "js"
GUEST_DIR = PACKAGE_DIR / "guest"
HOST_SCRIPT = JS_DIR / "host.mjs"
#: The REPL model code sees, the one file every environment runs; the guest imports it.
REPL_SCRIPT = Path(rlm_repl.__file__).resolve()
WASM_PAGE = 65536
PIPE_STREAM_LIMIT = 2**20


#: Interrupt files are named `<prefix><supervisor pid>-<random>` in the temporary directory.
INTERRUPT_FILE_PREFIX = "rlm-interrupts-"


@functools.cache
def sweep_left_interrupt_files() -> int:
    """Remove the interrupt files of supervisors that are gone (a name is removed by its own
    supervisor, unless it died while a sandbox started); once per process. Returns how many."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{INTERRUPT_FILE_PREFIX}*-*"):
        owner = path.name[len(INTERRUPT_FILE_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid() or _alive(int(owner)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(slots=True)
class InterruptFile:
    """The file host.mjs polls for interrupts: the big-endian i32 number of the request to
    interrupt, at offset 0, written by the supervisor. A private temporary file (mode 0600,
    the sandbox's uid its owner where it has one of its own): a confined sandbox sees it
    read-only at `confinement.SANDBOX_INTERRUPT_FILE` (bwrap binds it by descriptor, so no
    directory of ours need be open to it), an unconfined one reads it where it is. Its name
    is removed once the sandbox has opened it (`unlink`), and at `close` if it never did; one
    left by a supervisor that died meanwhile (its pid is in the name) is removed by the next
    supervisor's first `create` (`sweep_left_interrupt_files`)."""

    fd: int
    path: Path

    @classmethod
    def create(cls) -> InterruptFile:
        sweep_left_interrupt_files()
        # Empty until the first interrupt: host.mjs reads a short file as "none".
        fd, name = tempfile.mkstemp(prefix=f"{INTERRUPT_FILE_PREFIX}{os.getpid()}-")
        return cls(fd, Path(name))

    def interrupt(self, seq: int) -> None:
        # Not written (closed, or the file system failed): the request is not interrupted,
        # and the supervisor kills the sandbox when the grace ends, as for code that ran on.
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, struct.pack(">i", seq), 0)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        self.unlink()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Launched:
    """A started process, the supervisor's ends of its two pipes and its interrupt file."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    interrupts: InterruptFile
    read_transport: asyncio.BaseTransport
    #: What confines it (and the sandbox uid it holds until `close`).
    wrapped: Wrapped

    def close(self) -> None:
        """Close the supervisor's ends and give back the sandbox uid (idempotent; call it
        once the process has ended).

        The read transport is closed explicitly: the stdlib loop closes it at end of stream,
        but uvloop keeps a read pipe whose peer died open (and its fd) until it is closed.
        """
        self.writer.close()
        self.read_transport.close()
        self.interrupts.close()
        self.wrapped.release()


def network_namespace_available() -> bool:
    """Whether `unshare -n` works here (needs root or user namespaces); checked once."""
    unshare = shutil.which("unshare")
    return unshare is not None and _netns_works(unshare)


@functools.cache
def _netns_works(unshare: str) -> bool:
    return network_namespace_works(unshare)


def sandbox_pid(pid: int) -> int:
    """The Deno process of a sandbox started as `pid`: under bwrap it is a child of bwrap
    (the wrappers before bwrap exec in place, so they keep `pid`)."""
    current = pid
    for _ in range(4):
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            return current
        if not children:
            return current
        current = int(children[0])
    return current


def deno_argv(
    settings: WorkerSettings,
    *,
    fd_in: int,
    fd_out: int,
    interrupt_path: str,
    memory_bytes: int,
    make_snapshot: bool,
    snapshot_fd: int | None = None,
    map_with: str | None = None,
    snapshot_in_pipe: bool = False,
    code_cache: bool = True,
) -> list[str]:
    """The full command line: read access to Pyodide, our scripts and pipes; nothing else.

    The snapshot: `snapshot_fd`, its sealed memory file (`snapshot_memory`), which the sandbox
    reads and maps through the C library `map_with` (given with it: FFI permission for that
    library alone, revoked by the sandbox before any guest code runs); or `snapshot_in_pipe`,
    its bytes in the first frame.
    `code_cache` False where Deno's cache directory is the sandbox's own empty tmpfs: V8's
    code cache (~3 MB of host memory per sandbox, as tmpfs pages outside its PSS) would be
    written there at every start and never read, since no later sandbox sees it.
    """
    readable = [str(settings.pyodide_dir), str(JS_DIR), str(GUEST_DIR), str(REPL_SCRIPT)]
    readable += [f"/dev/fd/{fd_in}", interrupt_path]
    config = {
        "pyodide_dir": str(settings.pyodide_dir),
        "guest_dir": str(GUEST_DIR),
        "repl_path": str(REPL_SCRIPT),
        "snapshot_fd": snapshot_fd,
        "map_with": map_with,
        "snapshot_in_pipe": snapshot_in_pipe,
        "make_snapshot": make_snapshot,
        "fd_in": fd_in,
        "fd_out": fd_out,
        "interrupt_path": interrupt_path,
        "state_bytes": settings.state_bytes,
    }
    pages = max(1, memory_bytes // WASM_PAGE)
    # --expose-gc: host.mjs collects once before serving (and hides `gc` from the guest).
    v8_flags = [f"--wasm-max-mem-pages={pages}", "--expose-gc"]
    if settings.wasm_optimizing_compiler:
        v8_flags.append(f"--wasm-tiering-budget={settings.wasm_tiering_budget}")
    else:
        # Without TurboFan nothing is inlined, so Liftoff's code need not collect the call
        # feedback TurboFan inlines by: ~1 MiB less per loaded session, Python ~12 % faster.
        v8_flags += ["--liftoff-only", "--no-wasm-inlining"]
    return [
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
        f"--allow-ffi={map_with}" if map_with else "--deny-ffi",
        "--deny-sys",
        *([] if code_cache else ["--no-code-cache"]),
        f"--v8-flags={','.join(v8_flags)}",
        str(HOST_SCRIPT),
        json.dumps(config),
    ]


def scrubbed_env(wrapped: Wrapped, settings: WorkerSettings) -> dict[str, str]:
    """PATH and what Deno itself needs; nothing of the supervisor's environment."""
    if not wrapped.confined:  # Deno's cache dir is then the host's
        Path(wrapped.env["DENO_DIR"]).mkdir(parents=True, exist_ok=True)
    tunables = {"GLIBC_TUNABLES": settings.malloc_tunables} if settings.malloc_tunables else {}
    return {
        "PATH": "/usr/bin:/bin",
        **wrapped.env,
        **tunables,
        "DENO_NO_UPDATE_CHECK": "1",
        "NO_COLOR": "1",
    }


def confinement_support(settings: WorkerSettings) -> confinement.Support:
    """What confines sandboxes started with `settings` here (probed once)."""
    return confinement.support(settings, visible_paths(settings))


def check_confinement(settings: WorkerSettings) -> confinement.Support:
    """`confinement_support`, or SandboxStartError when a required layer is missing and
    RLM_SANDBOX_ALLOW_WEAKER is not set."""
    return confinement.check_allowed(settings, visible_paths(settings))


def visible_paths(settings: WorkerSettings) -> list[Path]:
    """What the sandbox's mount namespace shows (read-only) besides Deno, its libraries and
    the snapshot."""
    return [settings.pyodide_dir, JS_DIR, GUEST_DIR, REPL_SCRIPT]


@functools.cache
def c_library(deno_path: Path) -> str | None:
    """The C library Deno links (as `ldd` names it, which is also where a confined sandbox
    sees it): what a sandbox maps the snapshot through. None when `ldd` does not say."""
    linked = confinement.libraries(str(deno_path))
    return next((path for path in linked if Path(path).name == "libc.so.6"), None)


async def _wrap(
    settings: WorkerSettings,
    memory_bytes: int,
    interrupt_fd: int | None = None,
) -> Wrapped:
    # The first call probes the machine (runs bwrap once): off the event loop.
    support = await asyncio.to_thread(confinement.check_allowed, settings, visible_paths(settings))
    if (
        support.mode != "bwrap"
        and settings.network_namespace == "require"
        and support.unshare is None
    ):
        raise SandboxStartError("network_namespace='require' but `unshare -n` is not available")
    return confinement.wrap(
        settings,
        support,
        visible_paths(settings),
        memory_bytes=memory_bytes,
        interrupt_fd=interrupt_fd,
    )


async def launch(
    settings: WorkerSettings,
    *,
    memory_bytes: int,
    snapshot_path: Path | None,
    make_snapshot: bool = False,
) -> Launched:
    """Start a sandbox process; the caller waits for its first frame."""
    loop = asyncio.get_running_loop()
    map_with = snapshot_fd = piped = None
    if snapshot_path is not None:
        snapshot_fd = await asyncio.to_thread(snapshot_memory, snapshot_path)
        map_with = c_library(settings.deno_path) if settings.map_snapshot else None
        if map_with is None:  # its bytes over the pipe instead
            try:
                piped = await asyncio.to_thread(snapshot_bytes, snapshot_fd)
            finally:
                os.close(snapshot_fd)
                snapshot_fd = None
    interrupts = InterruptFile.create()
    try:
        wrapped = await _wrap(settings, memory_bytes, interrupts.fd)
    except BaseException:
        interrupts.close()
        if snapshot_fd is not None:
            os.close(snapshot_fd)
        raise
    child_in, parent_out = os.pipe()
    parent_in, child_out = os.pipe()
    # The snapshot's memory file goes with the pipes (everyone's to read, no one's to write:
    # not handed to the sandbox's uid), closed here once the child has it.
    child_fds = (child_in, child_out, *([] if snapshot_fd is None else [snapshot_fd]))
    try:
        if wrapped.uid is not None:
            # The sandbox reopens its pipes by /dev/fd/N, which checks the pipe's owner; it
            # reads its interrupt file as its owner (mode 0600).
            for fd in (child_in, child_out, interrupts.fd):
                os.fchown(fd, wrapped.uid, wrapped.uid)
        interrupt_path = (
            confinement.SANDBOX_INTERRUPT_FILE if wrapped.confined else str(interrupts.path)
        )
        argv = deno_argv(
            settings,
            fd_in=child_in,
            fd_out=child_out,
            interrupt_path=interrupt_path,
            memory_bytes=memory_bytes,
            make_snapshot=make_snapshot,
            snapshot_fd=snapshot_fd,
            map_with=map_with,
            snapshot_in_pipe=piped is not None,
            code_cache=not wrapped.confined,
        )
        process = await asyncio.create_subprocess_exec(
            *wrapped.prefix,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=scrubbed_env(wrapped, settings),
            cwd="/",
            pass_fds=(*child_fds, *wrapped.pass_fds),
            start_new_session=True,
            # Only with the setting: a preexec_fn makes Python fork instead of vfork.
            preexec_fn=page_merging.opt_in_before_exec() if settings.merge_pages else None,
        )
    except OSError as exc:
        for fd in (*child_fds, parent_in, parent_out):
            os.close(fd)
        interrupts.close()
        wrapped.close_fds()
        wrapped.release()
        raise SandboxStartError(f"cannot start {settings.deno_path}: {exc}") from exc
    for fd in child_fds:
        os.close(fd)
    wrapped.close_fds()
    if not wrapped.limits_set and not wrapped.confined:
        limit_resources(process.pid, settings, memory_bytes)  # Deno itself
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
        interrupts.close()
        wrapped.release()
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    if piped is not None:
        # The first frame: the snapshot's bytes (the pipe drains as Deno reads them).
        writer.write(encode_frame({"op": "snapshot"}, piped))
    return Launched(process, reader, writer, interrupts, read_transport, wrapped)


def limit_resources(pid: int, settings: WorkerSettings, memory_bytes: int) -> None:
    """Without the `prlimit` wrapper, the rlimits are set on the running Deno process `pid`
    (under bwrap, once it is ready and known)."""
    data = confinement.data_limit(settings, memory_bytes)
    limits = {
        resource.RLIMIT_NOFILE: (settings.max_open_files,) * 2,
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_DATA: (data, data),
        resource.RLIMIT_CPU: (settings.cpu_seconds, settings.cpu_seconds + 5),
    }
    for which, value in limits.items():
        try:
            resource.prlimit(pid, which, value)
        except (OSError, ValueError) as exc:
            logger.warning(
                "sandbox rlimit not applied", extra={"pid": pid, "limit": which, "error": str(exc)}
            )
