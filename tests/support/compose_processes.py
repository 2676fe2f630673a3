"""A compose file's services as local processes, run the way the image runs them.

No container engine runs here, so each service's own `command` runs with the image's
environment (the Dockerfile's last stage, `tests.support.dockerfile`) and the service's own
`environment`, and the file system the container would see is mapped onto directories:

- the image's WORKDIR (/app): a directory the user cannot write, as /app is root's;
- the image's venv (/app/.venv/bin/...): a venv the user can run (`tests.support.unprivileged`);
- /opt/rlm/pyodide: the project's node_modules/pyodide;
- each named volume: a directory the user owns (a fresh volume is `rlm`'s in the image);
- HOME and any other image path: directories the user cannot write, as under `read_only: true`;
- `tmpfs` /tmp: TMPDIR, a directory of the user's.

Service hostnames become 127.0.0.1 and every listening port (`--port`, `--metrics-port`,
Redis's 6379) a free one. The Redis image's command runs with the embedded server's binary
(valkey accepts the same options).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from broker.redis_server import find_redis_binary, free_port
from tests.support.dockerfile import ImageConfig
from tests.support.unprivileged import Unprivileged

REDIS_PORT = 6379
PORT_FLAGS = ("--port", "--metrics-port")
_INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")
_SERVICE_URL = re.compile(r"\b(https?|redis)://([a-z][a-z0-9-]*):(\d+)")
_LOOPBACK_URL = re.compile(r"\b(127\.0\.0\.1|localhost):(\d+)")


class MissingVariable(ValueError):
    """A `${VAR:?message}` (or `${VAR?message}`) whose variable is not set."""


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines, as `docker compose --env-file` reads them (no quotes needed here)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-d}`, `${VAR-d}`,
    `${VAR:?err}`, `${VAR?err}`."""

    def one(match: re.Match[str]) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        found = variables.get(name or bare)
        if op is None:
            return found or ""
        unset = found is None or (op.startswith(":") and found == "")
        if op.endswith("-"):
            return arg if unset else str(found)
        if unset:
            raise MissingVariable(f"{name}: {arg}")
        return str(found)

    return _INTERPOLATION.sub(one, value)


def listen_ports(service: Mapping[str, Any]) -> list[int]:
    """The ports a service listens on inside its container."""
    if is_redis(service):
        return [REDIS_PORT]
    command = [str(arg) for arg in service.get("command", [])]
    return [int(command[i + 1]) for i, arg in enumerate(command[:-1]) if arg in PORT_FLAGS]


def is_redis(service: Mapping[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0].split("/")[-1] in ("redis", "valkey")


def start_order(services: Mapping[str, Any]) -> list[str]:
    """Services without a profile, each after what it depends on."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for target in services[name].get("depends_on", {}):
                visit(target)
            order.append(name)

    for name, service in services.items():
        if not service.get("profiles"):
            visit(name)
    return order


class ComposeProcesses:
    """Start, check and stop a compose file's services as local processes of `user`."""

    def __init__(
        self,
        services: Mapping[str, Any],
        variables: Mapping[str, str],
        image: ImageConfig,
        user: Unprivileged,
        base: Path,
        container_paths: Mapping[str, Path],
    ) -> None:
        self.services = services
        self.variables = variables
        self.image = image
        self.user = user
        self.base = base
        self.app = self._read_only(base / "app")
        self.logs = base / "logs"
        self.logs.mkdir()
        self.ports = {
            (name, port): free_port()
            for name, service in services.items()
            for port in listen_ports(service)
        }
        # Longest container path first, so /app/.venv wins over /app.
        self._paths = dict(container_paths)
        self._paths[image.workdir] = self.app
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _read_only(self, path: Path) -> Path:
        """A directory the user can read and traverse but not write."""
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755 if os.geteuid() == 0 else 0o555)
        return path

    def volume(self, name: str) -> Path:
        return self.user.own(self.base / "volumes" / name)

    def _mounts(self, name: str) -> dict[str, Path]:
        service = self.services[name]
        mounts = dict(self._paths)
        for spec in service.get("volumes", []):
            source, _, target = str(spec).partition(":")
            mounts[target.split(":")[0]] = self.volume(source)
        home = self.image.env.get("HOME")
        if home:
            if service.get("read_only"):
                mounts[home] = self._read_only(self.base / f"home-{name}")
            else:
                mounts[home] = self.user.own(self.base / f"home-{name}")
        return mounts

    def host_path(self, name: str, path: str) -> str:
        """Where the container path `path` of service `name` is on this machine."""
        for prefix, host in sorted(self._mounts(name).items(), key=lambda kv: -len(kv[0])):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return str(host / Path(path).relative_to(prefix))
        if Path(path).exists():
            return path
        # Elsewhere in the image's file system: there, but not writable.
        return str(self._read_only(self.base / "image") / path.lstrip("/"))

    def _rewrite_urls(self, text: str) -> str:
        def local(match: re.Match[str]) -> str:
            scheme, host, port = match.groups()
            return f"{scheme}://127.0.0.1:{self.ports[(host, int(port))]}"

        return _SERVICE_URL.sub(local, interpolate(text, self.variables))

    def env(self, name: str) -> dict[str, str]:
        """The image's environment (for services built from our Dockerfile), then the
        service's, as this machine sees them."""
        env = {"LANG": "C.UTF-8", "TMPDIR": str(self.user.own(self.base / f"tmp-{name}"))}
        image_env = self.image.env if "build" in self.services[name] else {"PATH": "/usr/bin:/bin"}
        for key, value in image_env.items():
            if key == "PATH":
                value = ":".join(self.host_path(name, part) for part in value.split(":"))
            elif value.startswith("/"):
                value = self.host_path(name, value)
            env[key] = value
        for key, value in (self.services[name].get("environment") or {}).items():
            env[key] = self._rewrite_urls(str(value))
        return {**env, **self.user.env}

    def argv(self, name: str, command: list[Any], env: Mapping[str, str]) -> list[str]:
        """A command of service `name` (its `command` or a health check) to run here."""
        argv = [interpolate(str(arg), self.variables) for arg in command]
        argv = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in argv]
        for i, arg in enumerate(argv[:-1]):
            if arg in PORT_FLAGS:
                argv[i + 1] = str(self.ports[(name, int(argv[i + 1]))])
        argv = [self.host_path(name, arg) if arg.startswith("/") else arg for arg in argv]
        argv = [
            _LOOPBACK_URL.sub(lambda m: f"127.0.0.1:{self.ports[(name, int(m.group(2)))]}", arg)
            for arg in argv
        ]
        if is_redis(self.services[name]) and argv[0] == "redis-server":
            port = self.ports[(name, REDIS_PORT)]
            return [str(find_redis_binary()), *argv[1:], "--port", str(port), "--bind", "127.0.0.1"]
        found = shutil.which(argv[0], path=env["PATH"])
        assert found, f"{name}: {argv[0]} is not on the image's PATH"
        return [found, *argv[1:]]

    def start(self, name: str) -> None:
        env = self.env(name)
        log = (self.logs / f"{name}.log").open("wb")
        with log:
            self.processes[name] = subprocess.Popen(
                self.argv(name, self.services[name]["command"], env),
                env=env, cwd=self.app, stdout=log, stderr=log, **self.user.popen_kwargs(),
            )  # fmt: skip

    def run(self, name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run a one-shot service (`docker compose run --rm name`)."""
        env = self.env(name)
        return subprocess.run(
            self.argv(name, self.services[name]["command"], env),
            env=env, cwd=self.app, capture_output=True, text=True, timeout=timeout_s,
            check=False, **self.user.popen_kwargs(),
        )  # fmt: skip

    def healthy(self, name: str) -> bool:
        """The service's own health check passes (Redis: a PING, as `redis-cli ping`)."""
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: only the exec form of a health check is supported"
        if is_redis(self.services[name]) and test[1:] == ["redis-cli", "ping"]:
            client = redis.Redis(port=self.ports[(name, REDIS_PORT)], socket_timeout=2)
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False
            finally:
                client.close()
        env = self.env(name)
        done = subprocess.run(
            self.argv(name, test[1:], env), env=env, cwd=self.app, capture_output=True,
            timeout=30, check=False, **self.user.popen_kwargs(),
        )  # fmt: skip
        return done.returncode == 0

    def wait_healthy(self, name: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy(name):
            process = self.processes[name]
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never became healthy:\n{self.log(name)}")
            time.sleep(0.3)

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> None:
        """Stop the services in the reverse of their start order, as compose does."""
        for process in reversed(self.processes.values()):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
