"""The "command" environment: rlm_repl.py --serve behind a command template, for real.

The bwrap-python preset (this machine's CPython and numpy in bubblewrap, no network, the
broker through a relayed unix socket) against a real broker, poller, Redis and the scripted
LLM; attacker probes from inside the sandbox; a plain `python3 -I -S` template.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from host_poller.environments import EnvironmentSpec, create_environment, registered_environments
from host_poller.environments._relay import BrokerRelay
from host_poller.environments.base import Environment
from host_poller.environments.command import (
    CommandLine,
    CommandProcessError,
    CommandTemplateError,
    parse_template,
)
from host_poller.rlm import RLM
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig
from rlm_wire import broker_models as bp
from rlm_wire.runtime_models import Limits
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

BWRAP = "/usr/bin/bwrap"
PLAIN_PYTHON = "python3 -I -S {repl} --serve"
REPO = Path(__file__).resolve().parents[1]


def require_bwrap_and_numpy() -> None:
    """The bwrap-python preset's set-up; missing, the test fails and says what to install."""
    if not os.access(BWRAP, os.X_OK):
        pytest.fail(f"{BWRAP} is missing: install bubblewrap (apt-get install bubblewrap)")
    if importlib.util.find_spec("numpy") is None:
        pytest.fail(
            "numpy is missing from the venv: uv pip install --python .venv/bin/python numpy"
        )


@asynccontextmanager
async def command_env(
    broker_url: str, token: str, settings: HostSettings, **spec: Any
) -> AsyncIterator[Environment]:
    env = create_environment("command", settings)
    fields: dict[str, Any] = {
        "broker_url": broker_url,
        "session_token": token,
        "depth": 0,
        "max_depth": 1,
        "limits": Limits(timeout_s=20),
        "state": {"notes": []},
    }
    await env.start(EnvironmentSpec(**(fields | spec)))
    try:
        yield env
    finally:
        await env.aclose()
        await env.aclose()  # a second close is harmless


def bwrap_settings(**updates: Any) -> HostSettings:
    require_bwrap_and_numpy()
    return HostSettings(environment="command", command_preset="bwrap-python", **updates)


def test_command_is_registered() -> None:
    assert "command" in registered_environments()


async def test_bwrap_python_keeps_variables_and_reaches_the_broker_through_the_socket(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, seen = broker_session
    async with command_env(broker_server.url, token, bwrap_settings()) as env:
        await env.load_context("3 4 12 5")
        first = await env.execute(
            "import numpy as np\n"
            "values = np.array([int(v) for v in context.split()])\n"
            "reply = llm_query('sum ' + str(int(values.sum())))\n"
            "state['notes'].append(reply)\n"
            "print(np.__name__, values.size)"
        )
        assert first.error is None, first.error
        assert first.stdout == "numpy 4\n"
        assert first.state == {"notes": ["echo:sum 24"]}
        assert [(r.prompt, r.depth) for r in seen] == [("sum 24", 1)]
        second = await env.execute("FINAL(int(values @ values))")
        assert second.final == {"value": "194", "source": "FINAL"}
        assert await env.get_state() == {"notes": ["echo:sum 24"]}


async def test_sandboxed_code_has_no_network_no_host_secrets_and_no_host_writes(
    broker_server: BrokerServer,
    broker_session: tuple[str, list[bp.PendingRequest]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker's code in the sandbox: dial the broker's TCP port, read the host's
    secrets, write the host's files. Each fails; the unix socket is the only way out.

    The probe writes only new files (removed below) and appends to one in tmp_path: were
    the confinement broken, the test fails without damaging the host or the checkout."""
    token, _ = broker_session
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-secret")
    monkeypatch.setenv("RLM_TENANT_TOKEN", "tenant-host-secret")
    port = urlsplit(broker_server.url).port
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    probe_name = f".rlm-probe-{uuid.uuid4().hex}"
    new_files = [REPO / probe_name, Path("/usr") / probe_name, tmp_path / probe_name]
    probe = f"""
import os, socket, json
found = {{}}
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    found["tcp"] = "connected"
except OSError as exc:
    found["tcp"] = type(exc).__name__
found["secrets"] = sorted(k for k, v in os.environ.items() if "secret" in v)
found["names"] = sorted(os.environ)
for path, mode in [({str(victim)!r}, "a")] + [(p, "x") for p in {[str(f) for f in new_files]!r}]:
    try:
        with open(path, mode) as handle:
            handle.write("pwned")
        found[path] = "written"
    except OSError as exc:
        found[path] = type(exc).__name__
found["repl_writable"] = os.access({str(REPO / "rlm_repl.py")!r}, os.W_OK)
found["etc"] = os.path.exists("/etc/passwd")
print(json.dumps(found))
"""
    try:
        async with command_env(broker_server.url, token, bwrap_settings()) as env:
            result = await env.execute(probe)
            assert result.error is None, result.error
            found = json.loads(result.stdout)
            allowed = await env.execute("print(llm_query('still here'))")
        written = [f for f in new_files if f.exists()]
    finally:
        for path in new_files:
            path.unlink(missing_ok=True)
    assert found["tcp"] != "connected"
    assert found["secrets"] == []
    assert "OPENAI_API_KEY" not in found["names"]
    assert "RLM_TENANT_TOKEN" not in found["names"]
    # What counts is the host: a path under /tmp may exist inside the sandbox's own tmpfs
    # (a checkout under /tmp has its parents there), where writing harms nobody.
    assert found[str(Path("/usr") / probe_name)] != "written"
    assert written == []
    assert victim.read_text() == "intact"
    assert found["repl_writable"] is False
    assert found["etc"] is False
    assert allowed.stdout == "echo:still here\n"


async def test_a_stuck_execution_is_killed_and_the_next_one_starts_afresh(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, _ = broker_session
    settings = bwrap_settings(command_kill_grace_s=0.5)
    async with command_env(broker_server.url, token, settings) as env:
        await env.load_context("the context")
        kept = await env.execute(
            "before = 41\nstate['kept'] = True\nwhile True:\n    pass", timeout_s=0.5
        )
        # A Python loop: the REPL interrupts it and the variables stay.
        assert kept.error is not None
        assert kept.error.type == "TimeoutError"
        assert not kept.state_lost
        # A blocking C call ignores the interrupt: the process is killed.
        stuck = await env.execute("import time\ntime.sleep(600)", timeout_s=0.5)
        assert stuck.error is not None
        assert stuck.error.type == "TimeoutError"
        assert "killed" in stuck.error.message
        assert stuck.state_lost
        after = await env.execute("print(context, state)\nbefore")
        assert after.stdout == "the context {'notes': [], 'kept': True}\n"
        assert after.error is not None
        assert after.error.type == "NameError"


async def test_memory_and_output_are_capped_inside_the_sandbox(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, _ = broker_session
    settings = bwrap_settings(command_memory_bytes=1 << 30)
    limits = Limits(timeout_s=20, output_bytes=2048)
    async with command_env(broker_server.url, token, settings, limits=limits) as env:
        hog = await env.execute("kept = 1\nblob = bytearray(2 << 30)")
        flood = await env.execute("print('y' * 100_000)\nkept")
    assert hog.error is not None
    assert hog.error.type == "MemoryError"
    assert not hog.state_lost
    assert "output truncated" in flood.stdout
    assert len(flood.stdout) < 2300


async def test_a_crashed_process_is_reported_and_replaced(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, _ = broker_session
    async with command_env(broker_server.url, token, bwrap_settings()) as env:
        await env.load_context("ctx")
        crash = await env.execute("x = 1\nimport os\nos._exit(3)")
        assert crash.error is not None
        assert crash.error.type == "SandboxCrashedError"
        assert "exited (status 3)" in crash.error.message
        assert crash.state_lost
        again = await env.execute("print(context)")
        assert again.stdout == "ctx\n"
        assert not again.state_lost


async def test_model_output_cannot_reach_the_protocol_stream(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, _ = broker_session
    settings = HostSettings(environment="command", command_template=PLAIN_PYTHON)
    async with command_env(broker_server.url, token, settings) as env:
        forged = json.dumps({"stdout": "forged", "stderr": "", "duration_ms": 0, "memory_bytes": 0})
        result = await env.execute(
            f"import os, sys\nos.write(1, {forged!r}.encode() + b'\\n')\n"
            "sys.__stdout__.write('also\\n'); sys.__stdout__.flush()\n"
            "print(repr(sys.stdin.read()))"
        )
        assert result.error is None, result.error
        assert result.stdout == "''\n"
        follow = await env.execute("print('next')")
        assert follow.stdout == "next\n"


async def test_a_sandbox_that_garbles_the_protocol_is_ended_and_replaced(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    """Hostile code finds the protocol's private fd and writes garbage, then a huge state:
    each time the host ends the process (state_lost), and the session goes on."""
    token, _ = broker_session
    settings = bwrap_settings(state_max_bytes=4096)
    garble = (
        "import os\n"
        "for fd in range(3, 32):\n"
        "    try:\n"
        "        os.write(fd, b'not json\\n')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    async with command_env(broker_server.url, token, settings) as env:
        await env.load_context("ctx")
        # The host's state bound reaches the sandbox's REPL: an honest one keeps it.
        bounded = await env.execute("state['big'] = 'x' * 10_000")
        assert bounded.error is not None
        assert bounded.error.type == "StateError"
        assert not bounded.state_lost
        garbled = await env.execute(garble)
        forged = await env.execute(
            "import json, os\n"
            "big = {'stdout': '', 'stderr': '', 'duration_ms': 0, 'memory_bytes': 0,\n"
            "       'state': {'x': 'y' * 100_000}}\n"
            "for fd in range(3, 32):\n"
            "    try:\n"
            "        os.write(fd, json.dumps(big).encode() + b'\\n')\n"
            "    except OSError:\n"
            "        pass\n"
        )
        after = await env.execute("print(context, state)")
    for result in (garbled, forged):
        assert result.error is not None
        assert result.error.type == "SandboxProtocolError", result.error
        assert result.state_lost
        assert result.state == {"notes": []}
    assert after.stdout == "ctx {'notes': []}\n"


async def test_a_plain_python_template_over_tcp(
    broker_server: BrokerServer, broker_session: tuple[str, list[bp.PendingRequest]]
) -> None:
    token, seen = broker_session
    settings = HostSettings(environment="command", command_template=PLAIN_PYTHON)
    async with command_env(broker_server.url, token, settings, depth=1, max_depth=3) as env:
        await env.load_context(["a", "b"])
        first = await env.execute("n = len(context)\nprint(llm_query('hi'))")
        second = await env.execute("import sys\nprint(n, 'site' in sys.modules)")
    assert first.stdout == "echo:hi\n"
    assert second.stdout == "2 False\n"
    assert [r.depth for r in seen] == [2]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("bwrap 'unclosed", "RLM_COMMAND_TEMPLATE: No closing quotation"),
        ("python3 {repl} {nope}", "unknown placeholder {nope}"),
        ("python3 {repl!r}", "unknown placeholder {repl}"),
        ("docker exec x{env_args} py", "{env_args} must be a word of its own"),
        ("", "RLM_COMMAND_TEMPLATE is empty"),
        ("/no/such/sandbox-cli {repl}", "program '/no/such/sandbox-cli' not found"),
    ],
)
async def test_a_malformed_template_is_a_one_line_error(template: str, message: str) -> None:
    env = create_environment("command", HostSettings(command_template=template))
    spec = EnvironmentSpec("http://127.0.0.1:9", "t", 0, 1, Limits(), None)
    with pytest.raises(CommandTemplateError) as caught:
        await env.start(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_command_that_is_no_repl_fails_to_start_with_its_own_words() -> None:
    settings = HostSettings(command_template="sh -c 'echo no such image >&2; exit 7'")
    env = create_environment("command", settings)
    spec = EnvironmentSpec("http://127.0.0.1:9", "t", 0, 1, Limits(), None)
    with pytest.raises(CommandProcessError, match=r"status 7\): no such image"):
        await env.start(spec)


def test_env_args_forward_the_session_variables_by_name() -> None:
    line: CommandLine = parse_template("docker exec -i {env_args} box python3 /r.py --serve", "t")
    argv = line.render({}, ["RLM_BROKER_URL", "RLM_SESSION_TOKEN"])
    assert argv == [
        "docker", "exec", "-i", "-e", "RLM_BROKER_URL", "-e", "RLM_SESSION_TOKEN",
        "box", "python3", "/r.py", "--serve",
    ]  # fmt: skip
    assert not line.uses_socket


async def test_an_rlm_run_over_bubblewrap_uses_numpy_and_answers_right(
    redis_url: str, tmp_path: Path
) -> None:
    """Scripted root: numpy in iteration 0, the same variables plus llm_query (through the
    unix socket, the broker and the poller) in iteration 1, then FINAL."""
    require_bwrap_and_numpy()
    assert shutil.which("bwrap") is not None
    scenario = tmp_path / "numpy_command.json"
    root = "You are the root of a Recursive Language Model"
    scenario.write_text(
        json.dumps(
            {
                "name": "numpy_command",
                "rules": [
                    {
                        "name": "root-numpy",
                        "match": {"system": root, "iteration": 0},
                        "reply": {
                            "kind": "code",
                            "code": [
                                "import numpy as np",
                                "values = np.array([int(v) for v in context.split()])",
                                "print(values.size, int(values.sum()))",
                            ],
                        },
                    },
                    {
                        "name": "root-finish",
                        "match": {"system": root, "min_iteration": 1},
                        "reply": {
                            "kind": "code",
                            "code": [
                                "echoed = int(llm_query(f'Echo the number {int(values.sum())}'))",
                                "FINAL(echoed + int(values @ values))",
                            ],
                        },
                    },
                    {
                        "name": "sub-echo",
                        "match": {"system": "^$", "user": "^Echo the number"},
                        "reply": {"kind": "find", "pattern": "\\d+", "scope": "message"},
                    },
                ],
            }
        )
    )
    settings = bwrap_settings(trajectory_dir=tmp_path)
    config = StackConfig(redis_url=redis_url, scenario=str(scenario))
    async with LocalStack(config, rlm_stack_components(settings)) as stack:
        client = root_client(stack)
        try:
            rlm = RLM(model=client, settings=host_settings_for(stack, settings))
            result = await rlm.acompletion("3 4 12 5", "Sum plus sum of squares?")
        finally:
            await client.aclose()
    assert result.answer == str(24 + 194)
    assert result.answer_source == "FINAL"
    assert result.trajectory_path is not None
    events = [json.loads(line) for line in result.trajectory_path.read_text().splitlines()]
    assert any(e.get("environment") == "command" for e in events)
    iterations = [
        e for e in events if e.get("event") == "iteration" or e.get("type") == "iteration"
    ]
    assert iterations, events


async def _exchange(path: str, request: bytes) -> bytes:
    """Send `request` on a new connection to the socket; what comes back (b"": refused)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_the_relay_bounds_its_connections(broker_server: BrokerServer) -> None:
    """Connections over the bound are closed at once; freed slots serve again."""
    socket_dir = tempfile.mkdtemp(prefix="rlm-t-")
    path = os.path.join(socket_dir, "b.sock")
    relay = BrokerRelay(broker_server.url, path, max_connections=2, connect_timeout_s=5)
    await relay.start()
    health = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        held = [await asyncio.open_unix_connection(path) for _ in range(2)]
        assert await _exchange(path, health) == b""
        for _, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
        answer = b""
        for _ in range(50):  # the relay notices the closes on its next read
            answer = await _exchange(path, health)
            if answer:
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        await relay.aclose()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert not await asyncio.to_thread(os.path.exists, path)
