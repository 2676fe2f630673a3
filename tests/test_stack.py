"""The local stack (`rlm_cli.stack`) and `rlm up`: real Redis, broker, scripted LLM, poller."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from rlm_cli.env_file import (
    StackFileError,
    make_way_for_env_file,
    read_env_file,
    running_stack,
    write_env_file,
)
from rlm_cli.stack import (
    LocalStack,
    StackComponent,
    StackConfig,
    default_components,
    describe,
)
from rlm_wire.broker_models import LLMRequest
from tests.support.servers import BrokerServer, wait_until

COUNT_PROMPT = (
    "Count occurrences of the word 'cat' in the text below. Reply with the integer only.\n"
    "cat dog cat bird cat"
)


@pytest.fixture(autouse=True)
def _no_rlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RLM_"):
            monkeypatch.delenv(name)


@pytest.mark.anyio
async def test_stack_answers_through_its_poller(tmp_path: Path) -> None:
    components = default_components(sandbox=False)
    async with LocalStack(StackConfig(), components) as stack:
        assert stack.scripted_llm
        assert set(stack.urls) == {"redis", "broker", "llm"}
        async with stack.tenant_client() as tenant:
            session = await tenant.create_session(metadata={"run_id": "r", "depth": 0,
                                                            "max_depth": 1})  # fmt: skip
        async with stack.admin_client() as admin:
            health = await admin.health()
        from rlm_wire.broker_client import BrokerClient

        async with BrokerClient(stack.broker_url, session.token) as client:
            result = await client.enqueue(LLMRequest(prompt=COUNT_PROMPT, depth=1), wait_s=20)
            result = await client.wait_result(result)
        assert stack.poller is not None
        poller = stack.poller
    assert health["status"] == "ok"
    assert result.status == "done"
    assert result.response == "3"
    assert result.usage is not None and result.usage.calls == 1
    assert poller.stopping and poller.stats.answered == 1


class _Recorder(StackComponent):
    name = "recorder"

    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail

    async def start(self, stack: LocalStack) -> None:
        if self.fail:
            raise RuntimeError("cannot start")
        self.log.append("start")

    async def stop(self) -> None:
        self.log.append("stop")


@pytest.mark.anyio
async def test_failed_start_stops_what_started() -> None:
    log: list[str] = []
    stack = LocalStack(StackConfig(), [_Recorder(log), _Recorder(log), _Recorder(log, fail=True)])
    with pytest.raises(RuntimeError, match="cannot start"):
        await stack.start()
    assert log == ["start", "start", "stop", "stop"]


def test_env_file_is_private_and_the_terminal_gets_no_token(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(), [])
    stack.broker_url, stack.tenant_token, stack.admin_token = "http://b", "tenant-secret", "adm"
    stack.urls = {"broker": "http://b"}
    path = tmp_path / "dir" / "stack.env"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        write_env_file(path, stack.environ())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "RLM_TENANT_TOKEN=tenant-secret" in path.read_text().splitlines()
    assert read_env_file(path) == stack.environ()
    shown = "\n".join(describe(stack, path))
    assert "tenant-secret" not in shown and "adm\n" not in shown
    assert str(path) in shown


def test_env_file_is_created_exclusively_and_never_through_a_link(tmp_path: Path) -> None:
    existing = tmp_path / "existing.env"
    existing.write_text("theirs")
    with pytest.raises(StackFileError, match="it is an existing file"):
        write_env_file(existing, {"RLM_BROKER_URL": "http://b"})
    assert existing.read_text() == "theirs"

    target = tmp_path / "target"
    link = tmp_path / "link.env"
    link.symlink_to(target)  # dangling: O_CREAT alone would create the target
    with pytest.raises(StackFileError, match="it is a symbolic link"):
        write_env_file(link, {"RLM_BROKER_URL": "http://b"})
    assert not target.exists()
    with pytest.raises(StackFileError, match="symbolic link"):
        read_env_file(link)


def test_only_a_private_env_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    assert read_env_file(path) is None
    write_env_file(path, {"RLM_BROKER_URL": "http://b", "RLM_TENANT_TOKEN": "it's"})
    assert read_env_file(path) == {"RLM_BROKER_URL": "http://b", "RLM_TENANT_TOKEN": "it's"}
    path.chmod(0o644)
    with pytest.raises(StackFileError, match="not a private file"):
        read_env_file(path)


def test_the_written_env_file_removes_itself_only(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    written = write_env_file(path, {"RLM_BROKER_URL": "http://b"})
    path.unlink()
    path.write_text("another stack's")  # written by another `rlm up` meanwhile
    written.remove()
    assert path.read_text() == "another stack's"
    path.unlink()
    written = write_env_file(path, {"RLM_BROKER_URL": "http://b"})
    written.remove()
    assert not path.exists()


@pytest.mark.anyio
async def test_a_stale_env_file_makes_way_and_a_live_one_does_not(
    tmp_path: Path, broker_server: BrokerServer
) -> None:
    path = tmp_path / "stack.env"
    write_env_file(path, {"RLM_BROKER_URL": "http://127.0.0.1:1", "RLM_TENANT_TOKEN": "t"})
    assert await running_stack(path) is None
    await make_way_for_env_file(path)
    assert not path.exists()

    write_env_file(path, {"RLM_BROKER_URL": broker_server.url, "RLM_TENANT_TOKEN": "t"})
    found = await running_stack(path)
    assert found is not None and found.broker_url == broker_server.url
    with pytest.raises(StackFileError, match="already running"):
        await make_way_for_env_file(path)
    assert path.exists()


def test_rlm_up_serves_until_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / ".rlm" / "local-stack.env"  # the default, in the working directory
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    environ |= {"RLM_ENVIRONMENT": "local", "RLM_LOG_LEVEL": "WARNING"}
    rlm = Path(sys.executable).with_name("rlm")
    child = subprocess.Popen(
        [str(rlm), "up", "--port", "0", "--sandbox-port", "0", "--llm-port", "0"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        asyncio.run(wait_until(env_file.exists, timeout_s=60))
        values = {
            name: shlex.split(value)[0]
            for name, value in (line.split("=", 1) for line in env_file.read_text().splitlines())
        }
        health = httpx2.get(f"{values['RLM_BROKER_URL']}/health", timeout=10)
        assert health.status_code == 200
        # The README's second shell: source the file, ask through the running stack.
        context = tmp_path / "context.txt"
        context.write_text("a whale and a whale\n" * 50)
        asked = subprocess.run(
            [
                "bash",
                "-c",
                f'set -a; . "{env_file}"; set +a; '
                f'"{rlm}" ask --no-progress --context "{context}" '
                "\"How many times does the word 'whale' appear?\"",
            ],
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert asked.returncode == 0, asked.stderr[-2000:]
        assert asked.stdout.strip() == "100"
        assert "using the broker at" in asked.stderr
        # The same directory: `rlm ask` finds the stack by itself, through the env file.
        found = subprocess.run(
            [str(rlm), "ask", "--no-progress", "--context", str(context),
             "How many times does the word 'whale' appear?"],
            env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr[-2000:]
        assert found.stdout.strip() == "100"
        assert f"using the stack of `rlm up` at {values['RLM_BROKER_URL']}" in found.stderr
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert child.returncode == 0, stderr.decode()[-2000:]
    out = stdout.decode()
    assert "rlm stack is up" in out
    assert values["RLM_TENANT_TOKEN"] not in out + stderr.decode()
    assert values["RLM_ADMIN_TOKEN"] not in out + stderr.decode()
    assert not env_file.exists()
