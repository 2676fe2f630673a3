"""docker-compose.yml: valid, consistent, and what it starts works (as plain processes).

No Docker engine runs here, so the test reads the compose file and starts each service's
own `command` with its own `environment` as a local process: service hostnames become
127.0.0.1 and each listening port a free one. Redis is the embedded server. Then the
compose file's `demo` service runs three tenants' RLM queries at once through broker,
sandbox runtime, admin poller and scripted LLM, and checks every answer.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from broker.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
_URL = re.compile(r"\b(https?|redis)://([a-z][a-z0-9-]*):(\d+)")
_DEFAULT = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with no VAR set: the default."""
    return _DEFAULT.sub(lambda m: m.group(1), value)


def listen_port(service: dict[str, Any]) -> int | None:
    command = service.get("command", [])
    if "--port" in command:
        return int(command[command.index("--port") + 1])
    return None


def test_the_compose_file_fits_the_compose_spec() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_references_between_services_resolve() -> None:
    services = load()["services"]
    ports = {name: listen_port(s) for name, s in services.items()}
    ports["redis"] = 6379
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown {target}"
        for value in (service.get("environment") or {}).values():
            for _, host, port in _URL.findall(str(value)):
                assert host in services, f"{name} points at unknown host {host}"
                assert ports[host] == int(port), f"{name}: {host} listens on {ports[host]}"
        if service.get("image", "").startswith("rlm-broker"):
            assert service["command"][0] == "rlm"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def compose_processes(tmp_path: Path) -> Iterator[dict[str, Any]]:
    services = load()["services"]
    mapping = {(name, listen_port(s)): free_port() for name, s in services.items()}
    redis = RedisServer().start()
    mapping[("redis", 6379)] = redis.port

    def rewrite(text: str) -> str:
        def local(match: re.Match[str]) -> str:
            scheme, host, port = match.groups()
            return f"{scheme}://127.0.0.1:{mapping[(host, int(port))]}"

        return _URL.sub(local, interpolate(text))

    def command_and_env(name: str) -> tuple[list[str], dict[str, str]]:
        service = services[name]
        command = [interpolate(str(arg)) for arg in service["command"]]
        command = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in command]
        if "--port" in command:
            index = command.index("--port") + 1
            command[index] = str(mapping[(name, int(command[index]))])
        command[0] = str(Path(sys.executable).with_name(command[0]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
        env.update({k: rewrite(str(v)) for k, v in (service.get("environment") or {}).items()})
        env["RLM_LOG_LEVEL"] = "WARNING"
        env["RLM_TRAJECTORY_DIR"] = str(tmp_path / "trajectories")
        return command, env

    started: dict[str, subprocess.Popen[bytes]] = {}
    logs = {}
    try:
        for name in ("broker", "fake-llm", "sandbox", "poller"):
            command, env = command_and_env(name)
            logs[name] = (tmp_path / f"{name}.log").open("wb")
            started[name] = subprocess.Popen(command, env=env, stdout=logs[name], stderr=logs[name])
            port = listen_port(services[name])
            if port is not None:
                _wait_for_port(mapping[(name, port)], started[name])
        sandbox_url = f"http://127.0.0.1:{mapping[('sandbox', 8100)]}"
        deadline = time.monotonic() + 60
        while httpx2.get(f"{sandbox_url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the sandbox runtime never became healthy"
            time.sleep(0.2)
        yield {"command_and_env": command_and_env, "logs": tmp_path}
    finally:
        for process in started.values():
            process.terminate()
        for name, process in started.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            logs[name].close()
        redis.stop()


def test_the_compose_demo_answers_every_tenant(compose_processes: dict[str, Any]) -> None:
    command, env = compose_processes["command_and_env"]("demo")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    logs = compose_processes["logs"]
    assert result.returncode == 0, (
        result.stdout + result.stderr + (logs / "poller.log").read_text()[-3000:]
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("demo-")]
    assert len(lines) == 3
    assert all("[ok]" in line for line in lines), result.stdout
    # Each run's usage counts its sub-calls too, though another process (the poller) made
    # them: two root calls plus one sub-call per chunk of the context.
    calls = [int(re.search(r"(\d+) LLM calls", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert all(n > 2 for n in calls), result.stdout
