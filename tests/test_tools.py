"""Host-side tools (`RLM(tools=...)`): sandboxed code calls host callables by name, carried
through the broker like `llm_query` (real stack: Redis, broker, poller, the scripted LLM; and
a real Pyodide runtime), and the parts: naming rules, `invoke`'s bounds, the prelude."""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from host_poller.poller.errors import RequestFailed
from host_poller.rlm import RLM, RLMConfigError, RunBudgets, RunHooks, read_trajectory
from host_poller.rlm.prompts import system_prompt
from host_poller.rlm.tools import Toolbox, tools_from
from rlm_wire.codes import ErrorCode
from rlm_wire.runtime_client import RuntimeClient
from rlm_wire.runtime_models import BrokerAccess, CreateSession
from sandbox_runtime.service.bridge import BrokerBridge
from sandbox_runtime.service.serve import BackgroundRuntime
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import LLMCall
from tests.support.runs import ScriptedStack, scripted_stack

pytestmark = pytest.mark.anyio

ROOT = "You are the root of a Recursive Language Model"
RUNTIME_TOKEN = "tools-runtime-token"


def search(query: str, k: int = 3) -> list[str]:
    """Find passages about `query`; the k best.

    A second paragraph the prompt does not show."""
    return [f"{query}-{i}" for i in range(k)]


async def count_letters(text: str) -> dict[str, int]:
    """Count the letters of a text (an async tool)."""
    await asyncio.sleep(0)
    return {"letters": sum(c.isalpha() for c in text)}


def broken(page: int) -> str:
    """Always fails."""
    raise ValueError(f"no such page: {page}")


TOOLS = [search, count_letters, broken]


def _toolbox(tools: Any, *, timeout_s: float = 5.0, max_result_bytes: int = 1 << 16) -> Toolbox:
    return tools_from(tools, timeout_s=timeout_s, max_result_bytes=max_result_bytes)


def _scenario(name: str, code: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "rules": [
            {"name": "root", "match": {"system": ROOT}, "reply": {"kind": "code", "code": code}}
        ],
    }


@pytest.fixture(scope="module")
def runtime_url() -> Iterator[str]:
    with warm_runtime() as url:
        yield url


@contextlib.contextmanager
def warm_runtime() -> Iterator[str]:
    """A sandbox runtime (token `RUNTIME_TOKEN`) whose pool is warm: a run's session starts
    at once."""
    settings = RuntimeSettings(
        token=SecretStr(RUNTIME_TOKEN), port=0, pool_size=2, max_concurrent_spawns=2
    )
    with BackgroundRuntime(settings) as runtime:
        # On a thread: the fixture may be set up inside the test's running event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, _warm(runtime.url)).result(timeout=60)
        yield runtime.url


async def _warm(url: str) -> None:
    """Take one sandbox (waiting for the pool's first spawns) and end it."""
    async with RuntimeClient(url, RUNTIME_TOKEN) as client:
        created = await client.create_session(CreateSession())
        await client.execute(created.session_id, "1")
        await client.delete_session(created.session_id)


def rlm_on(run: ScriptedStack, environment: str, runtime_url: str | None, **options: Any) -> RLM:
    settings = run.settings.model_copy(update=options.pop("settings_update", {}))
    if runtime_url is not None:
        update = {"runtime_url": runtime_url, "runtime_token": SecretStr(RUNTIME_TOKEN)}
        settings = settings.model_copy(update=update)
    return RLM(
        model=run.client,
        settings=settings,
        hooks=options.pop("hooks", RunHooks(budgets=run.budgets)),
        environment=environment,
        max_depth=options.pop("max_depth", 1),
        **options,
    )


# --- the parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["context", "context_1", "llm_query", "call_tool", "state", "answer", "class", "_x"]
)
def test_a_tool_name_the_repl_uses_or_not_an_identifier_is_refused(name: str) -> None:
    with pytest.raises(RLMConfigError, match="tool name"):
        _toolbox({name: search})


def test_tools_are_named_by_their_function_or_by_the_dict() -> None:
    assert list(_toolbox(TOOLS).tools) == ["search", "count_letters", "broken"]
    assert list(_toolbox({"find": search}).tools) == ["find"]
    with pytest.raises(RLMConfigError, match="__name__"):
        _toolbox([lambda: 1])
    with pytest.raises(RLMConfigError, match="a list of callables or a dict"):
        _toolbox(search)
    with pytest.raises(RLMConfigError, match="given twice"):
        _toolbox([search, search])
    with pytest.raises(RLMConfigError, match="tool name"):
        RLM(tools={"print": search})


async def test_invoke_runs_sync_and_async_tools_and_bounds_what_comes_back() -> None:
    box = _toolbox(TOOLS, max_result_bytes=1024)
    assert await box.call("search", '{"args": ["a"], "kwargs": {"k": 2}}') == '["a-0", "a-1"]'
    assert await box.call("count_letters", '{"args": ["ab1c"], "kwargs": {}}') == '{"letters": 3}'
    failures = {
        "broken": ('{"args": [7], "kwargs": {}}', "raised ValueError: no such page: 7"),
        "search": ('{"args": ["x"], "kwargs": {"k": 1000}}', "over the bound of 1,024"),
        "nope": ('{"args": [], "kwargs": {}}', "no tool named 'nope'"),
    }
    for name, (arguments, why) in failures.items():
        with pytest.raises(RequestFailed, match=why) as caught:
            await box.call(name, arguments)
        assert caught.value.code in (ErrorCode.TOOL_FAILED, ErrorCode.TOOL_UNKNOWN)
    with pytest.raises(RequestFailed) as caught:
        await box.call("search", '["not", "the", "shape"]')
    assert caught.value.code == ErrorCode.INVALID_REQUEST


async def test_invoke_turns_a_timeout_and_a_non_json_result_into_tool_failed() -> None:
    async def slow() -> None:
        await asyncio.sleep(30)

    def a_set() -> set[int]:
        return {1}

    box = _toolbox({"slow": slow, "a_set": a_set}, timeout_s=0.2)
    with pytest.raises(RequestFailed, match=r"timed out after 0\.2 s") as caught:
        await box.call("slow", '{"args": [], "kwargs": {}}')
    assert caught.value.code == ErrorCode.TOOL_FAILED
    with pytest.raises(RequestFailed, match="returned a set, not a JSON value"):
        await box.call("a_set", '{"args": [], "kwargs": {}}')


def test_the_prelude_defines_plain_functions_and_the_tools_text_cannot_become_code() -> None:
    def evil() -> None:
        '''"""\nimport os; os.system("touch /tmp/pwned")\n"""'''

    box = _toolbox([search, evil])
    source = box.prelude()
    tree = ast.parse(source)
    assert [type(node) for node in tree.body] == [ast.FunctionDef, ast.FunctionDef]
    calls: list[tuple[Any, ...]] = []

    def call_tool(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "ok"

    namespace: dict[str, Any] = {"call_tool": call_tool}
    exec(compile(source, "<prelude>", "exec"), namespace)
    assert namespace["search"]("whale", k=2) == "ok"
    assert calls == [(("search", "whale"), {"k": 2})]
    assert "touch /tmp/pwned" in namespace["evil"].__doc__
    assert "Runs on the host" in namespace["search"].__doc__


def test_the_system_prompt_lists_each_tool_with_its_signature_and_first_doc_line() -> None:
    listing = _toolbox(TOOLS).listing()
    text = system_prompt("ctx", depth=0, max_depth=1, output_chars=100, tools=listing)
    assert "- `search(query: str, k: int = 3) -> list[str]`: Find passages about `query`" in text
    assert "A second paragraph" not in text
    assert "runs on the host" in text
    custom = system_prompt("ctx", depth=0, max_depth=1, output_chars=100, custom="Hi. {tools}!")
    assert custom == "Hi. !"
    assert system_prompt("c", depth=0, max_depth=1, output_chars=100, custom="Hi.", tools=listing)
    assert "Tools:" not in system_prompt("ctx", depth=0, max_depth=1, output_chars=100)


async def test_the_runtimes_bridge_refuses_a_tool_call_without_one_tool_and_one_prompt() -> None:
    # Refused before anything is sent: the broker URL is never dialled.
    access = BrokerAccess(url="http://127.0.0.1:9", token="unused", depth=0, max_depth=1)
    bridge = BrokerBridge(access, timeout_s=1, wait_s=1, retry=None)
    malformed = [
        LLMCall(kind="tool", prompts=["{}"]),
        LLMCall(kind="tool", tool="search", prompts=["{}", "{}"], batched=True),
        LLMCall(kind="llm", tool="search", prompts=["hi"]),
    ]
    try:
        for call in malformed:
            results = await bridge(call)
            assert {r.error["code"] for r in results if r.error} == {"invalid_request"}
    finally:
        await bridge.aclose()


# --- real runs ---------------------------------------------------------------------------

CALLS = [
    "hits = search('whale', k=2)",
    "counted = count_letters(text='ab1c')",
    "try:\n    broken(7)\nexcept LLMQueryError as exc:\n    failure = exc.code + '|' + exc.message",
    "shown = [n for n in ('search', 'count_letters', 'hits') if f'{n}: ' in SHOW_VARS()]",
    "FINAL(f\"{hits}|{counted['letters']}|{failure}|{shown}\")",
]
EXPECTED = (
    "['whale-0', 'whale-1']|3|tool_failed|tool 'broken' raised ValueError: no such page: 7"
    "|['hits']"  # SHOW_VARS lists the model's variables, not the tools' functions
)


async def _run_the_tools(
    redis_url: str, tmp_path: Path, environment: str, url: str | None, **options: Any
) -> None:
    async with scripted_stack(redis_url, tmp_path, _scenario("tools", CALLS)) as run:
        rlm = rlm_on(run, environment, url, tools=TOOLS, **options)
        result = await rlm.acompletion("ctx", "Use them")
    assert result.answer == EXPECTED, result.stop_detail
    assert result.usage.calls == 1  # the root's one turn: tools spend no LLM call
    assert result.trajectory_path is not None
    tool_calls = [
        event for event in read_trajectory(result.trajectory_path)
        if event.get("event") == "sub_call" and event.get("kind") == "tool"
    ]  # fmt: skip
    assert sorted(event["model"] for event in tool_calls) == [
        "tool:broken", "tool:count_letters", "tool:search"
    ]  # fmt: skip


async def test_model_code_calls_sync_async_and_failing_tools_in_the_local_environment(
    redis_url: str, tmp_path: Path
) -> None:
    await _run_the_tools(redis_url, tmp_path, "local", None)


@pytest.mark.parametrize("environment", ["pyodide", "remote"])
async def test_model_code_calls_sync_async_and_failing_tools_from_the_sandbox_runtime(
    environment: str, redis_url: str, tmp_path: Path, runtime_url: str
) -> None:
    await _run_the_tools(redis_url, tmp_path, environment, runtime_url)


async def test_tool_calls_pass_the_command_environments_socket_relay(
    redis_url: str, tmp_path: Path
) -> None:
    # bwrap-python: no network in the sandbox, the broker only through the unix socket.
    update = {"command_preset": "bwrap-python"}
    await _run_the_tools(redis_url, tmp_path, "command", None, settings_update=update)


async def test_the_tools_are_defined_again_after_the_sandbox_lost_its_variables(
    redis_url: str, tmp_path: Path
) -> None:
    scenario = {
        "name": "restarted",
        "rules": [
            {
                "name": "stuck",
                "match": {"system": ROOT, "iteration": 0},
                "reply": {"kind": "code", "code": ["import time\ntime.sleep(60)"]},
            },
            {
                "name": "after",
                "match": {"system": ROOT, "min_iteration": 1},
                "reply": {"kind": "code", "code": ["FINAL(str(search('after', k=1)))"]},
            },
        ],
    }
    # A blocking C call outlives the timeout and its grace: the command's process is killed
    # and a new one starts empty (`state_lost`).
    update = {"execution_timeout_s": 0.5, "command_kill_grace_s": 0.5}
    async with scripted_stack(redis_url, tmp_path, scenario) as run:
        rlm = rlm_on(run, "command", None, tools=[search], settings_update=update)
        result = await rlm.acompletion("ctx", "Recover")
    assert result.answer == "['after-0']", result.stop_detail
    assert result.iterations[0].code_runs[0].result.state_lost


async def test_a_poller_that_does_not_hold_the_run_answers_tool_unavailable(
    redis_url: str, tmp_path: Path
) -> None:
    code = [
        "try:\n    search('x')\nexcept LLMQueryError as exc:\n    FINAL(exc.code)",
    ]
    async with scripted_stack(redis_url, tmp_path, _scenario("elsewhere", code)) as run:
        # The run's tracker lives in a registry the stack's poller does not look in: as for
        # an RLM whose calls a standalone poller of another process answers.
        hooks = RunHooks(budgets=RunBudgets())
        result = await rlm_on(run, "local", None, tools=[search], hooks=hooks).acompletion(
            "ctx", "Search"
        )
    assert result.answer == "tool_unavailable"


async def test_a_sub_rlm_of_the_run_calls_the_same_tools(redis_url: str, tmp_path: Path) -> None:
    child = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"
    scenario = {
        "name": "sub-rlm-tools",
        "rules": [
            {
                "name": "child",
                "match": {"system": child},
                "reply": {"kind": "code", "code": ["FINAL(str(search('deep', k=1)))"]},
            },
            {
                "name": "root",
                "match": {"system": ROOT},
                "reply": {"kind": "code", "code": ["FINAL('child: ' + rlm_query('go'))"]},
            },
        ],
    }
    async with scripted_stack(redis_url, tmp_path, scenario) as run:
        rlm = rlm_on(run, "local", None, tools=[search], max_depth=2)
        result = await rlm.acompletion("ctx", "Delegate")
    assert result.answer == "child: ['deep-0']", result.stop_detail


def test_a_sync_tool_stuck_past_its_timeout_does_not_hold_up_the_end_of_the_loop() -> None:
    release = threading.Event()

    def stuck() -> int:
        release.wait(30)
        return 1

    def leave() -> None:
        raise SystemExit(3)

    async def calls() -> None:
        box = _toolbox({"stuck": stuck, "leave": leave}, timeout_s=0.2)
        with pytest.raises(RequestFailed, match="timed out"):
            await box.call("stuck", '{"args": [], "kwargs": {}}')
        with pytest.raises(RequestFailed, match="raised RuntimeError: SystemExit 3"):
            await box.call("leave", '{"args": [], "kwargs": {}}')

    # asyncio.run waits for the threads of the loop's default executor when it ends: a tool
    # stuck on one of them would hold it (until `release`).
    failures: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(calls())
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    ended = threading.Thread(target=main, daemon=True)
    ended.start()
    ended.join(timeout=20)
    release.set()
    assert not ended.is_alive()
    assert failures == []
