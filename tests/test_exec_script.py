"""The stdlib exec script in a plain `python -I -S` process against the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import rlm_repl as exec_script
from broker.redis_server import free_port
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from tests.support.brokers import tenant_and_session
from tests.support.servers import BrokerServer

pytestmark = pytest.mark.anyio

SCRIPT = Path(exec_script.__file__)

Reply = Callable[[p.PendingRequest], p.Answer]


def echo(request: p.PendingRequest) -> p.Answer:
    if (request.prompt or "").startswith("fail"):
        return p.Answer(id=request.id, error=p.ErrorInfo(code="llm_error", message="boom"))
    kind = (request.params or {}).get("kind")
    state = None
    if kind == "rlm":
        state = {"child": request.prompt, "seen": dict(request.state or {})}
    return p.Answer(
        id=request.id, response=f"echo:{request.prompt}:d{request.depth}:{kind}", state=state
    )


@asynccontextmanager
async def poller(
    tenant: BrokerClient, reply: Reply = echo, delay_s: float = 0.0
) -> AsyncIterator[list[p.PendingRequest]]:
    """A minimal poller answering every request with `reply`, after `delay_s`."""
    seen: list[p.PendingRequest] = []
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            batch = await tenant.pending(max_items=64, wait_s=0.2)
            if batch.requests:
                seen.extend(batch.requests)
                if delay_s:
                    await asyncio.sleep(delay_s)
                await tenant.respond_batch([reply(r) for r in batch.requests])

    task = asyncio.create_task(loop())
    try:
        yield seen
    finally:
        stop.set()
        await task


async def run_script(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`python -I -S exec_script.py ARGS`: isolated mode, no site-packages, nothing installed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(SCRIPT), *args,
        env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


CODE = """
import sys
assert "pydantic" not in sys.modules and not any("site-packages" in p for p in sys.path)
try:
    import pydantic
except ImportError:
    print("nothing installed")
print(llm_query("hello"))
print(llm_query_batched(["a", "b", "c"]))
state["mine"] = 1
print(rlm_query("child"))
print(sorted(state))
try:
    llm_query("fail please")
except LLMQueryError as exc:
    print("raised", type(exc).__name__, exc.code)
total = len(context)
FINAL_VAR("total")
"""


async def test_plain_cpython_process_calls_the_broker(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, sess):
        (tmp_path / "code.py").write_text(CODE)
        (tmp_path / "ctx.txt").write_text("x" * 1234)
        env = {
            "RLM_BROKER_URL": broker_server.url,
            "RLM_SESSION_TOKEN": sess.token,
            "RLM_DEPTH": "0",
            "RLM_MAX_DEPTH": "2",
        }
        async with poller(tenant.client) as seen:
            done = await run_script(
                ["code.py", "--context", "ctx.txt", "--result", "out.json"], env, tmp_path
            )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "nothing installed"
    assert lines[1] == "echo:hello:d1:llm"
    assert lines[2] == str([f"echo:{x}:d1:llm" for x in "abc"])
    assert lines[3] == "echo:child:d1:rlm"
    assert lines[4] == str(["child", "mine", "seen"])
    assert lines[5] == "raised LLMQueryError llm_error"
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["final"] == {"value": "1234", "source": "FINAL_VAR", "name": "total"}
    assert result["state"]["seen"] == {"mine": 1}
    # the batch went as one POST: the three prompts arrived together at the poller
    batch = [r for r in seen if r.prompt in ("a", "b", "c")]
    assert len(batch) == 3
    rlm = next(r for r in seen if r.prompt == "child")
    assert rlm.state == {"mine": 1}
    assert rlm.depth == 1


async def test_pending_results_are_waited_for_again(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, sess):
        env = {
            "RLM_BROKER_URL": broker_server.url,
            "RLM_SESSION_TOKEN": sess.token,
            "RLM_BROKER_WAIT_S": "0.1",
        }
        async with poller(tenant.client, delay_s=0.8):
            done = await run_script(
                ["-c", "print(llm_query('slow')); print(llm_query_batched(['x', 'y']))"],
                env,
                tmp_path,
            )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["echo:slow:d1:llm", "['echo:x:d1:llm', 'echo:y:d1:llm']"]


async def test_a_failed_prompt_in_a_batch_raises_with_the_other_answers(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    code = """
try:
    llm_query_batched(["ok", "fail now", "ok2"])
except LLMQueryError as exc:
    print(type(exc).__name__, exc.code, exc.index, exc.partial)
"""
    async with tenant_and_session(broker_server.url, broker_server.admin_token) as (tenant, sess):
        env = {"RLM_BROKER_URL": broker_server.url, "RLM_SESSION_TOKEN": sess.token}
        async with poller(tenant.client):
            done = await run_script(["-c", code], env, tmp_path)
    assert done.returncode == 0, done.stderr
    expected = "LLMQueryError llm_error 1 ['echo:ok:d1:llm', None, 'echo:ok2:d1:llm']"
    assert done.stdout.strip() == expected


async def test_a_bad_token_raises_a_broker_response_error(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    env = {"RLM_BROKER_URL": broker_server.url, "RLM_SESSION_TOKEN": "wrong"}
    code = "try:\n    llm_query('x')\nexcept LLMQueryError as e:\n"
    code += "    print(type(e).__name__, e.status)"
    done = await run_script(["-c", code], env, tmp_path)
    assert done.stdout.strip() == "BrokerResponseError 401"


async def test_an_unreachable_broker_is_retried_then_raises(tmp_path: Path) -> None:
    env = {
        "RLM_BROKER_URL": f"http://127.0.0.1:{free_port()}",
        "RLM_SESSION_TOKEN": "t",
        "RLM_BROKER_RETRY_DEADLINE_S": "1.5",
    }
    code = "try:\n    llm_query('x')\nexcept LLMQueryError as e:\n    print(type(e).__name__)"
    done = await run_script(["-c", code], env, tmp_path)
    assert done.stdout.strip() == "BrokerUnavailableError"


async def test_the_broker_coming_back_during_retries_is_used(
    broker_factory: Callable[..., BrokerServer], tmp_path: Path
) -> None:
    port = free_port()
    first = broker_factory(port=port)
    async with tenant_and_session(first.url, first.admin_token) as (_, sess):
        token = sess.token
    first.stop()
    env = {
        "RLM_BROKER_URL": f"http://127.0.0.1:{port}",
        "RLM_SESSION_TOKEN": token,
        "RLM_BROKER_RETRY_DEADLINE_S": "30",
    }
    code = (
        "try:\n    print(llm_query('x'))\nexcept LLMQueryError as e:\n    print(type(e).__name__)"
    )
    script = asyncio.create_task(run_script(["-c", code], env, tmp_path))
    await asyncio.sleep(0.5)
    second = broker_factory(port=port)  # same Redis: the session token is still valid
    async with BrokerClient(second.url, second.admin_token) as admin, poller(admin):
        done = await script
    assert done.stdout.strip() == "echo:x:d1:llm", done.stderr


def test_the_script_reports_errors_with_the_model_traceback(tmp_path: Path) -> None:
    env = {"RLM_BROKER_URL": "http://127.0.0.1:9", "RLM_SESSION_TOKEN": "t"}
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "-c", "x = 1\n1 / 0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr
    assert 'File "<cell-1>", line 2' in done.stderr
    assert "1 / 0" in done.stderr  # the cell's source line


def serve(requests: list[bytes], *args: str) -> tuple[list[dict[str, Any]], str, int]:
    """`rlm_repl.py --serve` fed `requests` (one per line) then EOF: replies, stderr, status."""
    env = {"RLM_BROKER_URL": "http://127.0.0.1:9", "RLM_SESSION_TOKEN": "t"}
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--serve", *args],
        input=b"".join(line + b"\n" for line in requests),
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    return replies, done.stderr.decode(), done.returncode


def test_serve_keeps_the_namespace_between_requests_and_ends_at_eof() -> None:
    replies, _, status = serve(
        [
            json.dumps({"context": ["a", "b"], "state": {"k": 1}}).encode(),
            json.dumps({"code": "n = len(context)\nstate['n'] = n"}).encode(),
            json.dumps({"code": "print(n + 40)\n_ = FINAL(n)", "timeout_s": 5}).encode(),
            json.dumps({"code": "while True:\n    pass", "timeout_s": 0.2}).encode(),
            json.dumps({"code": "n"}).encode(),
            json.dumps({"code": "print('z' * 5000)", "output_bytes": 100}).encode(),
        ]
    )
    assert status == 0
    assert replies[0] == {"ok": True}
    assert replies[1]["error"] is None
    assert replies[1]["state"] == {"k": 1, "n": 2}
    assert replies[2]["stdout"] == "42\n"
    assert replies[2]["final"] == {"value": "2", "source": "FINAL"}
    assert set(replies[2]) >= {"stdout", "stderr", "error", "final", "state", "sub_calls"}
    assert replies[3]["error"]["type"] == "TimeoutError"
    assert replies[4]["stdout"] == "2\n"  # the interrupted cell kept the namespace
    assert replies[5]["stdout"].startswith("z" * 100 + "\n[output truncated")


def test_serve_answers_malformed_requests_with_a_protocol_error_and_goes_on() -> None:
    bad = [
        b"not json",
        b"[1, 2]",
        b"{}",
        json.dumps({"code": 1}).encode(),
        json.dumps({"code": "1", "context": "x"}).encode(),
        json.dumps({"code": "1", "timeout_s": -1}).encode(),
        json.dumps({"code": "1", "timeout_s": True}).encode(),
        json.dumps({"timeout_s": 1}).encode(),
        json.dumps({"code": "1", "output_bytes": 0}).encode(),
        json.dumps({"code": "1", "output_bytes": 1.5}).encode(),
        json.dumps({"state": [1]}).encode(),
        json.dumps({"evil": 1}).encode(),
        json.dumps({"code": "x" * 5000}).encode(),  # over --max-line-bytes
    ]
    replies, _, status = serve([*bad, json.dumps({"code": "print('alive')"}).encode()],
                               "--max-line-bytes", "1000")  # fmt: skip
    assert status == 0
    assert len(replies) == len(bad) + 1
    for reply in replies[:-1]:
        assert set(reply) == {"protocol_error"}
        assert isinstance(reply["protocol_error"], str)
    assert "over 1000 bytes" in str(replies[-2]["protocol_error"])
    assert replies[-1]["stdout"] == "alive\n"


def test_serve_keeps_model_code_off_the_protocol_streams() -> None:
    """Code that writes to fd 1 or reads stdin (directly, or from a child process) can
    neither forge a reply nor swallow the next request."""
    code = (
        "import os, subprocess, sys\n"
        "os.write(1, b'{\"forged\": true}\\n')\n"
        "subprocess.run([sys.executable, '-c', 'print(\"child says hi\")'])\n"
        "print(repr(sys.stdin.read()), repr(os.read(0, 100)))"
    )
    replies, stderr, status = serve(
        [json.dumps({"code": code}).encode(), json.dumps({"code": "print('next')"}).encode()]
    )
    assert status == 0
    assert [r.get("stdout") for r in replies] == ["'' b''\n", "next\n"]
    assert '{"forged": true}' in stderr
    assert "child says hi" in stderr


def test_a_unix_broker_url_needs_a_socket_path() -> None:
    with pytest.raises(ValueError, match="no socket path"):
        exec_script.HttpTransport("http+unix://", "t")


async def test_the_script_reaches_the_broker_through_a_unix_socket(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    """`http+unix://` (the bwrap sandbox's only way out), relayed to the broker's TCP port."""
    from host_poller.environments._relay import BrokerRelay

    socket_dir = tempfile.mkdtemp(prefix="rlm-t-")  # short: AF_UNIX paths are bounded
    socket_path = os.path.join(socket_dir, "b.sock")
    relay = BrokerRelay(broker_server.url, socket_path, max_connections=4, connect_timeout_s=5)
    await relay.start()
    try:
        async with tenant_and_session(broker_server.url, broker_server.admin_token) as (t, s):
            env = {
                "RLM_BROKER_URL": "http+unix://" + urllib.parse.quote(socket_path, safe=""),
                "RLM_SESSION_TOKEN": s.token,
            }
            async with poller(t.client):
                code = "print(llm_query('via unix'), llm_query_batched(['a', 'b']))"
                done = await run_script(["-c", code], env, tmp_path)
    finally:
        await relay.aclose()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo:via unix:d1:llm ['echo:a:d1:llm', 'echo:b:d1:llm']\n"
