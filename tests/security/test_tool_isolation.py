"""Host-side tools, attacked from the sandbox: model code in Pyodide tries to reach a tool of
another run of the same process (by forging its name through `call_tool`), a tool when its
own run has none, and the tool's code itself (by importing the host module that defines it).
The tool must run in the host process, for its own run only (real stack, real Pyodide)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_poller.rlm import Budget
from host_poller.rlm.tools import tools_from
from tests.support.runs import scripted_stack
from tests.test_tools import rlm_on, warm_runtime

pytestmark = pytest.mark.anyio

ROOT = "You are the root of a Recursive Language Model"
ATTACK = [
    "import os",
    "host_pid = whoami()",
    "try:\n    import tests.security.test_tool_isolation as host_module\n"
    "    reached = 'imported the host module'\nexcept ImportError:\n    reached = 'no import'",
    "try:\n    stolen = call_tool('read_secret')\nexcept LLMQueryError as exc:\n"
    "    stolen = exc.code",
    "FINAL(f'{host_pid}|{os.getpid()}|{reached}|{stolen}')",
]
FORGE_ONLY = [
    "try:\n    stolen = call_tool('whoami')\nexcept LLMQueryError as exc:\n    stolen = exc.code",
    "FINAL(stolen)",
]


@pytest.fixture(scope="module")
def runtime_url() -> Iterator[str]:
    with warm_runtime() as url:
        yield url


def _scenario(name: str, code: list[str]) -> dict[str, Any]:
    rule = {"name": "root", "match": {"system": ROOT}, "reply": {"kind": "code", "code": code}}
    return {"name": name, "rules": [rule]}


async def test_sandboxed_code_reaches_only_its_own_runs_tools_which_run_on_the_host(
    redis_url: str, tmp_path: Path, runtime_url: str
) -> None:
    secret_reads: list[str] = []

    def read_secret() -> str:
        secret_reads.append("read")
        return "the other run's secret"

    def whoami() -> int:
        return os.getpid()

    async with scripted_stack(redis_url, tmp_path, _scenario("attack", ATTACK)) as run:
        # Another run of this process, with a tool of its own, registered as an RLM does.
        other, _ = run.budgets.open("another-run-of-this-process", Budget())
        other.tools = tools_from([read_secret], timeout_s=5, max_result_bytes=1024)
        try:
            rlm = rlm_on(run, "pyodide", runtime_url, tools=[whoami])
            result = await rlm.acompletion("ctx", "Attack")
        finally:
            run.budgets.release("another-run-of-this-process")
    assert result.answer is not None, result.stop_detail
    host_pid, sandbox_pid, reached, stolen = result.answer.split("|")
    assert int(host_pid) == os.getpid()  # the tool ran in this (the RLM's) process
    assert int(sandbox_pid) != os.getpid()
    assert reached == "no import"
    assert stolen == "tool_unknown"
    assert secret_reads == []


async def test_a_run_without_tools_cannot_call_any(
    redis_url: str, tmp_path: Path, runtime_url: str
) -> None:
    calls: list[int] = []

    def whoami() -> int:
        calls.append(os.getpid())
        return os.getpid()

    async with scripted_stack(redis_url, tmp_path, _scenario("forge", FORGE_ONLY)) as run:
        other, _ = run.budgets.open("a-run-with-tools", Budget())
        other.tools = tools_from([whoami], timeout_s=5, max_result_bytes=1024)
        try:
            result = await rlm_on(run, "pyodide", runtime_url).acompletion("ctx", "Forge")
        finally:
            run.budgets.release("a-run-with-tools")
    assert result.answer == "tool_unknown", result.stop_detail
    assert calls == []
