"""`rlm session create/close` as real processes against a real broker, poller and fake LLM.

What the command prints must be all a sandbox needs: the exec script runs in a plain
`python -I -S` process whose environment holds only the printed variables, and its
`llm_query` is answered through the broker by a real poller calling the scripted LLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fake_llm import FakeLLMServer
from host_poller.rlm.budget import RunBudgets
from rlm_cli.main import cli
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import assert_json_error
from tests.support.servers import BrokerServer
from tests.test_exec_script import SCRIPT, run_script
from tests.test_poller import echo_scenario, poller_of, poller_settings, running

RLM = Path(sys.executable).with_name("rlm")
PRINTED = {
    "RLM_BROKER_URL", "RLM_SESSION_TOKEN", "RLM_BROKER_WAIT_S", "RLM_CALL_TIMEOUT_S",
    "RLM_DEPTH", "RLM_MAX_DEPTH",
}  # fmt: skip


async def rlm(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """The `rlm` console script with only `env` (and PATH-free: no RLM_* leaks in)."""
    process = await asyncio.create_subprocess_exec(
        str(RLM), *args, env={"RLM_LOG_LEVEL": "WARNING", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def exported(text: str) -> dict[str, str]:
    """The `export NAME=value` lines of `text`, unquoted as a POSIX shell would."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        keyword, assignment = shlex.split(line)
        assert keyword == "export"
        name, _, value = assignment.partition("=")
        variables[name] = value
    return variables


async def new_tenant(broker: BrokerServer) -> str:
    async with BrokerClient(broker.url, broker.admin_token) as admin:
        return (await admin.create_tenant("acme")).tenant_id


def admin_env(broker: BrokerServer) -> dict[str, str]:
    return {"RLM_ADMIN_TOKEN": broker.admin_token, "RLM_BROKER_URL": broker.url}


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """`rlm ARGS` in this process (quicker than a child) with only the RLM_* of `env`."""
    for name in list(os.environ):
        if name.startswith("RLM_"):
            monkeypatch.delenv(name)

    def run(args: list[str], **env: str) -> Result:
        return CliRunner().invoke(cli, args, env=env)

    return run


def tenant_of(invoke: Callable[..., Result], broker: BrokerServer, name: str = "acme") -> str:
    done = invoke(["tenant", "create", name], **admin_env(broker))
    assert done.exit_code == 0, done.output
    tenant_id: str = json.loads(done.stdout)["tenant_id"]
    return tenant_id


@pytest.mark.anyio
async def test_the_printed_variables_are_all_the_exec_script_needs(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    tenant_id = await new_tenant(broker_server)
    done = await rlm(
        ["session", "create", "--tenant", tenant_id, "--ttl", "600", "--wait", "2"],
        **admin_env(broker_server),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# rlm session ")
    variables = exported(done.stdout)
    assert set(variables) == PRINTED
    assert variables["RLM_BROKER_URL"] == broker_server.url
    assert variables["RLM_BROKER_WAIT_S"] == "2"
    # a real shell reads the lines the same way
    shell = await asyncio.to_thread(
        subprocess.run,
        ["bash", "--norc", "--noprofile", "-c", 'eval "$1"; printf %s "$RLM_SESSION_TOKEN"',
         "_", done.stdout],
        env={}, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert shell.stdout == variables["RLM_SESSION_TOKEN"]

    code = "print(llm_query('hi'))"
    with FakeLLMServer(echo_scenario()) as fake:
        async with (
            poller_of(poller_settings(broker_server), fake.base_url) as poller,
            running(poller),
        ):
            answered = await run_script(["-c", code], variables, tmp_path)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == "echo: hi\n"
    assert fake.stats()["requests"] == 1


def test_json_output_public_url_and_ttl(
    broker_server: BrokerServer, invoke: Callable[..., Result]
) -> None:
    tenant_id = tenant_of(invoke, broker_server)
    before = time.time()
    done = invoke(
        ["session", "create", "--tenant", tenant_id, "--ttl", "120", "--format", "json",
         "--public-url", "https://broker.example.com", "--max-depth", "3"],
        **admin_env(broker_server),
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert set(payload) == {"session_id", "run_id", "expires_at", "env"}
    assert before < payload["expires_at"] <= time.time() + 120
    env = payload["env"]
    assert set(env) == PRINTED
    assert env["RLM_BROKER_URL"] == "https://broker.example.com"
    assert (env["RLM_DEPTH"], env["RLM_MAX_DEPTH"]) == ("0", "3")


def test_a_budget_given_at_creation_is_enforced_by_the_poller(
    broker_server: BrokerServer, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    tenant_id = tenant_of(invoke, broker_server)
    args = ["session", "create", "--tenant", tenant_id, "--max-calls", "1", "--format", "json"]
    payload = json.loads(invoke(args, **admin_env(broker_server)).stdout)
    code = (
        "print(llm_query('one'))\n"
        "try:\n    llm_query('two')\nexcept LLMQueryError as e:\n    print(e.code)"
    )

    async def run() -> subprocess.CompletedProcess[str]:
        with FakeLLMServer(echo_scenario()) as fake:
            budgets = RunBudgets()
            async with (
                poller_of(poller_settings(broker_server), fake.base_url, budgets=budgets) as poller,
                running(poller),
            ):
                return await run_script(["-c", code], payload["env"], tmp_path)

    done = asyncio.run(run())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["echo: one", "budget_exceeded"]


def test_a_tenant_token_opens_a_session_of_its_own(
    broker_server: BrokerServer, invoke: Callable[..., Result]
) -> None:
    created = invoke(["tenant", "create", "own"], **admin_env(broker_server))
    token = json.loads(created.stdout)["token"]
    done = invoke(["session", "create"], RLM_TENANT_TOKEN=token, RLM_BROKER_URL=broker_server.url)
    assert done.exit_code == 0, done.output
    assert set(exported(done.stdout)) == PRINTED


def test_close_revokes_the_token(
    broker_server: BrokerServer, invoke: Callable[..., Result], tmp_path: Path
) -> None:
    tenant_id = tenant_of(invoke, broker_server)
    args = ["session", "create", "--tenant", tenant_id, "--format", "json"]
    payload = json.loads(invoke(args, **admin_env(broker_server)).stdout)
    closed = invoke(
        ["session", "close", payload["session_id"], "--tenant", tenant_id],
        **admin_env(broker_server),
    )
    assert closed.exit_code == 0, closed.output
    assert closed.stdout.strip() == f"closed {payload['session_id']}"
    code = "try:\n    llm_query('x')\nexcept LLMQueryError as e:\n"
    code += "    print(type(e).__name__, e.status)"
    refused = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "-c", code],
        env=payload["env"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.stdout.strip() == "BrokerResponseError 401", refused.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--tenant", "t"], {}, "--tenant needs RLM_ADMIN_TOKEN"),
        ([], {}, "name the tenant with --tenant"),
        (["--tenant", "nobody"], {"admin": "1"}, "404 not_found: no tenant nobody"),
        (["--tenant", "t"], {"RLM_ADMIN_TOKEN": "wrong"}, "401"),
        (["--tenant", "t", "--ttl", "0"], {"admin": "1"}, "Invalid value for '--ttl'"),
        (["--tenant", "REAL", "--ttl", "99999999"], {"admin": "1"}, "RLM_MAX_SESSION_TTL_S"),
        (["--tenant", "t", "--broker-url", "http://127.0.0.1:9"], {"admin": "1"}, "cannot create"),
        (["--tenant", "t", "--public-url", "broker:8000"], {"admin": "1"}, "not an http(s) URL"),
    ],
)
def test_errors_are_one_line(
    broker_server: BrokerServer,
    invoke: Callable[..., Result],
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    if "REAL" in args:  # a tenant that exists, so that only the ttl is wrong
        args = [tenant_of(invoke, broker_server) if a == "REAL" else a for a in args]
    environ = {"RLM_BROKER_URL": broker_server.url, **env}
    if environ.pop("admin", None):
        environ["RLM_ADMIN_TOKEN"] = broker_server.admin_token
    done = invoke(["session", "create", *args], **environ)
    assert done.exit_code not in (0, None)
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    assert "Traceback" not in done.output
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, done.stderr
    assert expected in error_lines[0]
    assert not done.stdout


@pytest.mark.anyio
async def test_a_leaked_session_token_reaches_nothing_but_its_own_calls(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    """What docs/deploy/tunnels.md says a leaked token cannot do, tried as its holder would."""
    tenant_id = await new_tenant(broker_server)
    done = await rlm(
        ["session", "create", "--tenant", tenant_id, "--format", "json"],
        **admin_env(broker_server),
    )
    leaked = json.loads(done.stdout)
    token = leaked["env"]["RLM_SESSION_TOKEN"]
    async with BrokerClient(broker_server.url, broker_server.admin_token) as admin:
        other = await admin.create_session(tenant_id=tenant_id)
    async with BrokerClient(broker_server.url, other.token) as neighbour:
        theirs = await neighbour.enqueue(p.LLMRequest(prompt="private"), wait_s=0)
    url = broker_server.url
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/pending", {}),
        ("POST", "/respond", {"json": {"id": theirs.id, "response": "forged"}}),
        ("POST", "/sessions", {"json": {}}),
        ("DELETE", f"/sessions/{other.session_id}", {}),
        ("DELETE", f"/sessions/{leaked['session_id']}", {}),
        ("POST", "/tenants", {"json": {"name": "mine"}}),
        ("GET", f"/requests/{theirs.id}", {}),
    ]
    for method, path, kwargs in attempts:
        await assert_json_error(url, token, method, path, kwargs, 403)
