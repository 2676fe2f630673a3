"""docker-compose.yml and the Dockerfile: valid, consistent, and what they start works.

No container engine runs here (scripts/podman-demo.sh runs the real image where podman is
installed), so the end-to-end test starts each compose service's own `command` as a local
process the way the image runs it (`tests.support.compose_processes`): as an unprivileged
user (`nobody` when the tests run as root), from a working directory that user cannot write
(the image's root-owned /app), with the Dockerfile's environment, a read-only HOME and the
named volumes as directories the user owns. Every service must pass its own health check;
then the compose file's `demo` service runs three tenants' RLM queries at once, through the
second broker replica while the poller polls the first, and every answer is checked.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from rlm_cli.config_docs import SETTINGS_CLASSES, load
from tests.support.compose_processes import (
    ComposeProcesses,
    MissingVariable,
    interpolate,
    listen_ports,
    read_env_file,
    start_order,
)
from tests.support.dockerfile import last_stage
from tests.support.unprivileged import Unprivileged, unprivileged_user

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEMO_ENV = ROOT / "deploy" / "compose" / "demo.env"
_SERVICE_URL = re.compile(r"\b(https?|redis)://([a-z][a-z0-9-]*):(\d+)")
_VARIABLE = re.compile(r"\$\{(\w+)(:?[-?])?")
#: Where the Dockerfile puts what it copies from its build stage.
IMAGE_VENV = "/app/.venv"
IMAGE_PYODIDE = "/opt/rlm/pyodide"


def services() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return dict(data["services"])


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
    found = services()
    volumes = set(yaml.safe_load(COMPOSE.read_text()).get("volumes") or {})
    ports = {name: listen_ports(service) for name, service in found.items()}
    for name, service in found.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in found, f"{name} depends on unknown {target}"
            if condition.get("condition") == "service_healthy":
                assert not found[target]["healthcheck"].get("disable"), f"{target}: no check"
        for value in (service.get("environment") or {}).values():
            for _, host, port in _SERVICE_URL.findall(str(value)):
                assert host in found, f"{name} points at unknown host {host}"
                assert int(port) in ports[host], f"{name}: {host} listens on {ports[host]}"
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {published}"
        for spec in service.get("volumes", []):
            assert str(spec).split(":")[0] in volumes, f"{name}: undeclared volume {spec}"
        assert "healthcheck" in service, f"{name} has no health check (nor `disable: true`)"
        if "build" in service:
            assert service["command"][0] == "rlm"
            assert service.get("read_only"), f"{name}: the image's file system is read-only"


def test_no_token_has_a_default_outside_the_demo_env_file() -> None:
    text = COMPOSE.read_text()
    variables = {name: op for name, op in _VARIABLE.findall(text)}
    assert variables, "the compose file takes no variables"
    for name, op in variables.items():
        assert op == ":?", f"${{{name}}} must be required (`${{{name}:?...}}`), not {op!r}"
    with pytest.raises(MissingVariable, match="RLM_ADMIN_TOKEN"):
        interpolate(text, {})
    demo = read_env_file(DEMO_ENV)
    assert set(variables) <= set(demo), "deploy/compose/demo.env must set every variable"
    interpolate(text, demo)


def _path_settings() -> Iterator[tuple[str, Any]]:
    """(variable, default) of every setting whose value is a file system path."""
    for _, path in SETTINGS_CLASSES:
        cls = load(path)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            if Path in (get_args(field.annotation) or (field.annotation,)):
                default = field.get_default(call_default_factory=True)
                yield f"{prefix}{field_name}".upper(), default


#: Path settings relative to the working directory on purpose, and why the image may ignore it.
RELATIVE_ON_PURPOSE = {
    "RLM_STACK_ENV_FILE": "`rlm up` and `rlm ask` meet in the checkout; the image runs neither",
}


def test_no_setting_defaults_to_a_path_under_the_working_directory() -> None:
    """A process started in a directory it cannot write (the image's /app) works with the
    defaults: every path default is absolute (or unset)."""
    for variable, default in _path_settings():
        if variable not in RELATIVE_ON_PURPOSE:
            assert default is None or Path(default).is_absolute(), f"{variable}={default}"


def test_the_image_runs_as_a_user_with_absolute_data_directories() -> None:
    image = last_stage(DOCKERFILE)
    assert image.user not in ("", "root", "0")
    for variable, _ in _path_settings():
        if variable in image.env:
            assert Path(image.env[variable]).is_absolute(), f"{variable}={image.env[variable]}"
    for variable in ("RLM_TRAJECTORY_DIR", "RLM_LEDGER_PATH", "RLM_SANDBOX_CACHE_DIR"):
        assert image.env[variable].startswith("/data/"), variable
    assert image.env["RLM_SANDBOX_PYODIDE_DIR"] == IMAGE_PYODIDE
    assert image.env["PATH"].startswith(f"{IMAGE_VENV}/bin:")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="rlm-compose-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for directory in path.rglob("*"):
            if directory.is_dir() and not directory.is_symlink():
                directory.chmod(0o755)
        shutil.rmtree(path)


@pytest.fixture
def user(base: Path) -> Unprivileged:
    found = unprivileged_user(base)
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture
def stack(base: Path, user: Unprivileged) -> Iterator[ComposeProcesses]:
    found = services()
    compose = ComposeProcesses(
        found,
        read_env_file(DEMO_ENV),
        last_stage(DOCKERFILE),
        user,
        base,
        {IMAGE_VENV: user.venv, IMAGE_PYODIDE: (ROOT / "node_modules" / "pyodide").resolve()},
    )
    try:
        # As compose does: a service starts as soon as what it depends on is healthy, so
        # services that depend on nothing still pending start side by side.
        pending = start_order(found)
        while pending:
            ready = [n for n in pending if not set(found[n].get("depends_on", {})) & set(pending)]
            for name in ready:
                compose.start(name)
            for name in ready:
                compose.wait_healthy(name)
            pending = [n for n in pending if n not in ready]
        yield compose
    finally:
        compose.stop()


def _events(log: str) -> list[dict[str, Any]]:
    events = []
    for line in log.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_compose_demo_answers_every_tenant_as_the_image_runs_it(
    stack: ComposeProcesses,
) -> None:
    result = stack.run("demo", timeout_s=240)
    assert result.returncode == 0, (
        f"{result.stdout}{result.stderr}\n--- poller ---\n{stack.log('poller')}"
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("demo-")]
    assert len(lines) == 3
    assert all("[ok]" in line for line in lines), result.stdout
    # Each run's usage counts its sub-calls too, though another process (the poller) made
    # them: two root calls plus one sub-call per chunk of the context.
    calls = [int(re.search(r"(\d+) LLM calls", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert all(n > 2 for n in calls), result.stdout

    # What was written went to the volumes, as the image's environment says.
    data = stack.volume("rlm-data")
    assert len(list((data / "trajectories").glob("*.jsonl"))) >= 3
    with sqlite3.connect(data / "usage.sqlite3") as ledger:
        assert ledger.execute("select count(*) from sqlite_master").fetchone()[0] > 0
    redis_data = stack.volume("redis-data")
    assert list(redis_data.glob("appendonly*")), "Redis keeps no append-only file"
    assert not any(stack.app.iterdir())

    # The sandbox runtime says at start which isolation layers it has.
    isolation = [
        event
        for event in _events(stack.log("sandbox", tail=10**6))
        if event.get("event", "").startswith("sandbox isolation")
    ]
    assert len(isolation) == 1, stack.log("sandbox")
    # As an unprivileged user bubblewrap confines each sandbox inside a user namespace (with
    # seccomp, no network, its own mounts), but cannot give it a uid of its own.
    assert isolation[0]["level"] == "warning"
    assert "own_uid" in isolation[0]["event"]
    assert isolation[0]["isolation"]["missing"] == ["own_uid"]
