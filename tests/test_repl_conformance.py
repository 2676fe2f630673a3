"""One REPL, one outcome: the same programs under `local`, `pyodide` and the exec script.

Each program runs in a fresh REPL of each of the three, against one real stack: broker and
Redis, the real poller answering sub-calls with the scripted LLM (and running `rlm_query` as
a sub-RLM), the sandbox runtime (Deno + Pyodide), and a plain `python -I -S rlm_repl.py`.
The three outcomes (stdout, stderr, error, final, state) must be equal, and equal to the
behaviour documented in docs/rlm.md ("The REPL").
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import rlm_repl
from broker.redis_server import RedisServer
from host_poller.environments import EnvironmentSpec, create_environment
from host_poller.llm.profiles import LLMSettings
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RunBudgets
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components
from rlm_cli.stack import LocalStack, StackConfig
from rlm_wire.runtime_models import ExecutionResult, Limits

pytestmark = pytest.mark.anyio

SCRIPT = Path(rlm_repl.__file__)
CONTEXT = "the context text"
OUTPUT_BYTES = 1024
CHILD = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"
SCENARIO = {
    "name": "conformance",
    "rules": [
        {
            "name": "sub-fail",
            "match": {"system": "^$", "user": "^fail"},
            "reply": {"kind": "text", "text": "never sent"},
            "faults": {"fail_first_n": 1_000_000, "status": 400},
        },
        {
            "name": "sub-echo",
            "match": {"system": "^$", "user": "^(?P<prompt>.*)$"},
            "reply": {"kind": "text", "text": "re:${prompt}"},
        },
        {
            "name": "child-root",
            "match": {"system": CHILD},
            "reply": {
                "kind": "code",
                "code": [
                    "state['last'] = context",
                    "state[context] = len(context)",
                    "FINAL('child:' + context)",
                ],
            },
        },
    ],
}

Outcome = dict[str, Any]


@dataclass(frozen=True)
class Program:
    name: str
    code: str
    check: Callable[[Outcome], None]
    max_depth: int = 1
    state: dict[str, Any] = field(default_factory=dict)


def _error(outcome: Outcome) -> dict[str, Any]:
    error: dict[str, Any] | None = outcome["error"]
    assert error is not None, outcome
    return error


def _expect(outcome: Outcome, *, stdout: str = "", error_type: str | None = None) -> None:
    assert outcome["stdout"] == stdout
    assert (outcome["error"] or {}).get("type") == error_type


def _check_batched_failure(outcome: Outcome) -> None:
    lines = outcome["stdout"].splitlines()
    assert lines[0] == "LLMQueryError llm_http_error 1 ['re:a', None, 're:c']"
    assert lines[1].startswith("llm_http_error: prompt 1: ")
    assert outcome["error"] is None


def _check_single_failure(outcome: Outcome) -> None:
    error = _error(outcome)
    assert error["type"] == "LLMQueryError"
    assert error["message"].startswith("llm_http_error: ")
    assert 'File "<cell-1>", line 2, in <module>' in error["traceback"]
    assert "rlm_repl" not in error["traceback"]


def _check_state_error(outcome: Outcome) -> None:
    assert outcome["stdout"] == "StateError True True invalid_state\n"
    error = _error(outcome)
    assert error["type"] == "StateError"
    assert outcome["state"] == {"kept": 1}  # the last valid state


def _check_final(outcome: Outcome) -> None:
    assert outcome["stdout"] == "43\n42\n"
    assert outcome["final"] == {"value": "42", "source": "FINAL"}


def _check_final_var(outcome: Outcome) -> None:
    assert outcome["stdout"] == "7\n"  # FINAL_VAR returns the value; the echo shows it
    assert outcome["final"] == {"value": "7", "source": "FINAL_VAR", "name": "total"}


def _check_final_var_missing(outcome: Outcome) -> None:
    error = _error(outcome)
    assert error["type"] == "NameError"
    assert "no variable named 'the answer is 42'" in error["message"]
    assert outcome["final"] is None


def _check_echo(outcome: Outcome) -> None:
    assert outcome["stdout"] == "side effect\n42\n"  # the last bare expression only


def _check_show_vars(outcome: Outcome) -> None:
    assert outcome["stdout"] == (
        "context: str = 'the context text'\n"
        "state: dict = {}\n"
        "answer: dict = {'content': '', 'ready': False}\n"
        "names: list = ['a', 'b']\n"
        "n: int = 3\n"
    )


def _check_output_cap(outcome: Outcome) -> None:
    marker = "\n[output truncated: about 2977 more bytes dropped]\n"
    assert outcome["stdout"] == "é" * 512 + marker
    assert (
        outcome["stderr"]
        == "x" * OUTPUT_BYTES + "\n[output truncated: about 1 more bytes dropped]\n"
    )


def _check_max_depth(outcome: Outcome) -> None:
    refusal = "rlm_query is not allowed at depth 0 (max_depth 1); use llm_query"
    assert outcome["stdout"] == f"max_depth None\nmax_depth: {refusal}\n"
    error = _error(outcome)
    assert error["type"] == "LLMQueryError"
    assert error["message"] == f"max_depth: prompt 0: {refusal} (2 of 2 prompts failed)"


def _check_state_merge(outcome: Outcome) -> None:
    assert outcome["stdout"] == "['child:one', 'child:three']\nchild:four\n"
    assert outcome["error"] is None
    assert outcome["state"] == {"kept": 1, "last": "four", "one": 3, "three": 5, "four": 4}


PROGRAMS = [
    Program(
        "batched-failure",
        "try:\n"
        "    llm_query_batched(['a', 'fail b', 'c'])\n"
        "except LLMQueryError as exc:\n"
        "    print(type(exc).__name__, exc.code, exc.index, exc.partial)\n"
        "    print(exc)\n",
        _check_batched_failure,
    ),
    Program("single-failure", "x = 1\nllm_query('fail now')\n", _check_single_failure),
    Program(
        "state-error",
        "state['bad'] = object()\n"
        "try:\n"
        "    rlm_query('x')\n"
        "except LLMQueryError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, StateError), isinstance(exc, ValueError),"
        " exc.code)\n",
        _check_state_error,
        state={"kept": 1},
    ),
    Program("final", "r = FINAL(42)\nprint(r + 1)\nr\n", _check_final),
    Program("final-var", "total = 7\nFINAL_VAR('total')\n", _check_final_var),
    Program("final-var-missing", "FINAL_VAR('the answer is 42')\n", _check_final_var_missing),
    Program("echo", "print('side effect')\nx = 40\nNone\nx + 2\n", _check_echo),
    Program("echo-repr", "'text'\n", lambda o: _expect(o, stdout="'text'\n")),
    Program("echo-none", "None\n", lambda o: _expect(o, stdout="")),
    Program(
        "show-vars",
        "names = ['a', 'b']\nimport json\nn = 3\nSHOW_VARS()\n",
        _check_show_vars,
    ),
    Program(
        "output-cap",
        "import sys\nprint('é' * 2000)\nprint('x' * 1025, end='', file=sys.stderr)\n",
        _check_output_cap,
    ),
    Program(
        "rlm-query-at-max-depth",
        "try:\n"
        "    rlm_query('go deeper')\n"
        "except LLMQueryError as exc:\n"
        "    print(exc.code, exc.index)\n"
        "    print(exc)\n"
        "rlm_query_batched(['a', 'b'])\n",
        _check_max_depth,
    ),
    Program(
        "state-merge",
        "print(rlm_query_batched(['one', 'three']))\nprint(rlm_query('four'))\n",
        _check_state_merge,
        max_depth=2,
        state={"kept": 1, "last": "none"},
    ),
    Program(
        "traceback",
        "def f():\n    return 1 / 0\n\nf()\n",
        lambda o: _expect(o, error_type="ZeroDivisionError"),
    ),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Stack:
    stack: LocalStack
    settings: HostSettings
    tmp: Path


@pytest.fixture(scope="module")
async def stack(
    anyio_backend: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("conformance")
    scenario = tmp / "conformance.json"
    scenario.write_text(json.dumps(SCENARIO))
    if not redis_server.running:
        redis_server.start()
    host = HostSettings(environment="pyodide", runtime_url=None, trajectory_dir=tmp / "runs")
    config = StackConfig(
        redis_url=redis_server.url,
        scenario=str(scenario),
        llm_settings=LLMSettings(llm_profiles=()),
        poller_settings=PollerSettings(poller_wait_s=0.5, poller_grace_s=2.0),
    )
    components = rlm_stack_components(host, budgets=RunBudgets())
    async with LocalStack(config, components) as local_stack:
        yield Stack(local_stack, host_settings_for(local_stack, host), tmp)


async def _session_token(stack: Stack, program: Program) -> str:
    async with stack.stack.tenant_client() as tenant:
        created = await tenant.create_session(metadata={"depth": 0, "max_depth": program.max_depth})
    return created.token


async def run_in_environment(stack: Stack, name: str, program: Program) -> Outcome:
    spec = EnvironmentSpec(
        broker_url=stack.stack.broker_url,
        session_token=await _session_token(stack, program),
        depth=0,
        max_depth=program.max_depth,
        limits=Limits(output_bytes=OUTPUT_BYTES, timeout_s=60),
        state=program.state,
    )
    env = create_environment(name, stack.settings)
    await env.start(spec)
    try:
        await env.load_context(CONTEXT)
        result = await env.execute(program.code)
    finally:
        await env.aclose()
    return _outcome(result)


def _outcome(result: ExecutionResult) -> Outcome:
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "error": result.error.model_dump() if result.error is not None else None,
        "final": result.final,
        "state": result.state,
    }


async def run_exec_script(stack: Stack, program: Program) -> Outcome:
    """`python -I -S rlm_repl.py`: isolated mode, no site-packages, nothing installed."""
    workdir = stack.tmp / f"script-{program.name}"
    workdir.mkdir()
    (workdir / "code.py").write_text(program.code)
    (workdir / "ctx.txt").write_text(CONTEXT)
    (workdir / "state.json").write_text(json.dumps(program.state))
    env = {
        "RLM_BROKER_URL": stack.stack.broker_url,
        "RLM_SESSION_TOKEN": await _session_token(stack, program),
        "RLM_DEPTH": "0",
        "RLM_MAX_DEPTH": str(program.max_depth),
    }
    args = ["code.py", "--context", "ctx.txt", "--state", "state.json", "--result", "out.json"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(SCRIPT), *args, "--output-bytes", str(OUTPUT_BYTES),
        env=env, cwd=workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode in (0, 1), err.decode()
    outcome: Outcome = json.loads((workdir / "out.json").read_text())
    return outcome


_CARETS = re.compile(r"^\s*[~^]+\s*$")


def _comparable(outcome: Outcome) -> Outcome:
    """The outcome without the traceback's caret lines: the interpreter version draws those
    (Pyodide's Python is not the host's), not the REPL."""
    error = outcome["error"]
    if error is None or not error.get("traceback"):
        return outcome
    lines = [ln for ln in error["traceback"].splitlines() if not _CARETS.match(ln)]
    return {**outcome, "error": {**error, "traceback": "\n".join(lines)}}


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
async def test_one_outcome_in_every_environment(stack: Stack, program: Program) -> None:
    local = await run_in_environment(stack, "local", program)
    pyodide = await run_in_environment(stack, "pyodide", program)
    script = await run_exec_script(stack, program)
    program.check(local)
    assert _comparable(pyodide) == _comparable(local)
    assert _comparable(script) == _comparable(local)
