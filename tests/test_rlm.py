"""Whole RLM runs: real broker, real Redis, the real poller, the openai SDK against the
scripted LLM, and the "local" environment."""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_llm import load_scenario
from host_poller.llm.profiles import LLMSettings
from host_poller.llm.types import LLMClient
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RLM, Budget, RLMConfigError, RunBudgets, RunHooks, read_trajectory
from host_poller.settings import HostSettings
from rlm_cli import RLM as EmbeddedRLM
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig
from tests.support.servers import wait_until

pytestmark = pytest.mark.anyio

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "field"]


def make_text(word: str, count: int, lines: int = 400, seed: int = 7) -> str:
    """About `lines` lines of filler with `word` placed exactly `count` times."""
    rng = random.Random(seed)
    rows = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(lines)]
    for index in rng.sample(range(lines), count):
        rows[index] += f" {word}"
    return "\n".join(rows) + "\n"


@dataclass
class Harness:
    stack: LocalStack
    settings: HostSettings
    budgets: RunBudgets
    root: LLMClient
    events: list[tuple[str, dict[str, Any]]]

    def rlm(self, **kwargs: Any) -> RLM:
        hooks = RunHooks(budgets=self.budgets, on_event=lambda e, f: self.events.append((e, f)))
        return RLM(
            model=self.root,
            environment="local",
            settings=self.settings,
            hooks=hooks,
            **kwargs,
        )

    def fake_stats(self) -> dict[str, Any]:
        server = self.stack.component("llm")._server  # type: ignore[attr-defined]
        stats: dict[str, Any] = server.stats()
        return stats


@asynccontextmanager
async def harness(
    redis_url: str, tmp_path: Path, scenario: str | dict[str, Any], **settings: Any
) -> AsyncIterator[Harness]:
    if isinstance(scenario, dict):
        path = tmp_path / f"{scenario['name']}.json"
        path.write_text(json.dumps(scenario))
        scenario = str(path)
    host = HostSettings(environment="local", trajectory_dir=tmp_path / "trajectories", **settings)
    budgets = RunBudgets()
    config = StackConfig(
        redis_url=redis_url,
        scenario=scenario,
        llm_settings=LLMSettings(llm_profiles=()),
        poller_settings=PollerSettings(poller_wait_s=0.5, poller_grace_s=2.0),
    )
    async with LocalStack(config, rlm_stack_components(host, budgets=budgets)) as stack:
        root = root_client(stack)
        try:
            yield Harness(stack, host_settings_for(stack, host), budgets, root, [])
        finally:
            await root.aclose()
    assert len(budgets) == 0, "every run released its budget tracker"


ROOT = "You are the root of a Recursive Language Model"
CHILD = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"


def scenario(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "rules": list(rules)}


def code_rule(name: str, code: str, **match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"system": ROOT, **match},
        "reply": {"kind": "code", "code": code},
    }


# --- depth 1 and 2 -----------------------------------------------------------------------


async def test_depth_1_count_words_gives_the_right_count(redis_url: str, tmp_path: Path) -> None:
    text = make_text("whale", 37)
    # Each scripted reply takes 50 ms, so parallel sub-calls must overlap at the fake LLM
    # (and sequential ones could not).
    slow = load_scenario("count_words").model_dump(mode="json")
    slow["faults"] = {**(slow.get("faults") or {}), "delay_s": 0.05}
    async with harness(redis_url, tmp_path, slow) as h:
        result = await h.rlm(max_depth=1).acompletion(text, "How often is the word 'whale' used?")
        stats = h.fake_stats()
    assert result.answer == "37"
    assert (result.stop_reason, result.answer_source) == ("final", "FINAL_VAR")
    assert len(result.iterations) == 2
    assert set(result.usage_by_depth) == {0, 1}
    assert result.usage.calls == stats["requests"]
    # the chunks' sub-calls were in flight together
    assert stats["max_in_flight"] >= 2
    events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start"
    assert kinds[-1] == "run_end"
    assert kinds.count("iteration") == 2
    assert "sub_call" in kinds
    first = next(e for e in events if e["event"] == "iteration")
    assert "llm_query_batched" in first["code"][0]["code"]
    assert first["code"][0]["stdout"].endswith("total 37\n")
    assert events[-1]["answer"] == "37"
    sub = next(e for e in events if e["event"] == "sub_call")
    assert sub["depth"] == 1
    assert sub["usage"]["calls"] == 1


async def test_depth_2_sub_rlms_count_and_share_state(redis_url: str, tmp_path: Path) -> None:
    text = make_text("whale", 23, lines=600)
    async with harness(redis_url, tmp_path, "depth2") as h:
        result = await h.rlm(max_depth=2).acompletion(text, "How often is the word 'whale' used?")
    assert result.answer == "23"
    assert result.final_state == {"children": 2}, "each child bumped the shared counter"
    assert set(result.usage_by_depth) == {0, 1, 2}
    events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
    child_iterations = [e for e in events if e["event"] == "iteration" and e["depth"] == 1]
    assert len(child_iterations) == 4  # two children, two turns each
    assert all(e.get("request_id") for e in child_iterations)
    assert (
        "children 2"
        in next(e for e in events if e["event"] == "iteration" and e["depth"] == 0)["code"][0][
            "stdout"
        ]
    )


async def test_the_operator_caps_a_tenants_depth(redis_url: str, tmp_path: Path) -> None:
    """max_depth comes from tenant-written metadata; RLM_SUB_RLM_MAX_DEPTH bounds it."""
    text = make_text("whale", 23, lines=600)
    from host_poller.rlm import RLMRunError

    async with harness(redis_url, tmp_path, "depth2", sub_rlm_max_depth=1) as h:
        # The scripted root, refused its sub-RLMs, asks for a `total` it never made, turn
        # after turn: the run stops on the repeated error.
        with pytest.raises(RLMRunError, match="NameError: FINAL_VAR: no variable named") as run:
            await h.rlm(max_depth=2).acompletion(text, "How often is the word 'whale' used?")
    events = read_trajectory(run.value.trajectory_path)  # type: ignore[arg-type]
    assert not [e for e in events if e["event"] == "iteration" and e["depth"] == 1]
    first = next(e for e in events if e["event"] == "iteration" and e["depth"] == 0)
    error = first["code"][0]["error"]
    assert error is not None
    assert "RLM_SUB_RLM_MAX_DEPTH" in error["message"]


STATE_SCENARIO = scenario(
    "state_merge",
    code_rule(
        "child",
        "\n".join(
            [
                "name = context.split()[0]",
                "state['order'] = state.get('order', []) + [name]",
                "state['last'] = name",
                "state[name] = state['base'] * 10",
                "FINAL(name.upper())",
            ]
        ),
        system=CHILD,
    ),
    code_rule(
        "root",
        "\n".join(
            [
                "state['base'] = 4",
                "answers = rlm_query_batched(['first child', 'second child', 'third child'])",
                "print(answers, state)",
                "FINAL(','.join(answers))",
            ]
        ),
    ),
)


async def test_batched_children_merge_state_in_prompt_order(redis_url: str, tmp_path: Path) -> None:
    async with harness(redis_url, tmp_path, STATE_SCENARIO) as h:
        result = await h.rlm(max_depth=2).acompletion("ctx", "merge")
    assert result.answer == "FIRST,SECOND,THIRD"
    state = result.final_state
    assert state["base"] == 4
    assert (state["first"], state["second"], state["third"]) == (40, 40, 40)
    # every child started from the same parent state; later prompts win on the same key
    assert state["last"] == "third"
    assert state["order"] == ["third"]


# --- the ways a run ends -----------------------------------------------------------------


async def test_the_answer_dict_ends_the_run(redis_url: str, tmp_path: Path) -> None:
    text = make_text("whale", 11)
    async with harness(redis_url, tmp_path, "answer_dict") as h:
        result = await h.rlm().acompletion(text, "How often is the word 'whale' used?")
    assert (result.answer, result.answer_source, len(result.iterations)) == ("11", "answer", 1)


ENDINGS = scenario(
    "endings",
    code_rule("final-fn", "FINAL(f'len={len(context)}')", user="final-function"),
    code_rule("final-var-fn", "n = len(context) * 2\nFINAL_VAR('n')", user="final-var-function"),
    {"name": "final-tag", "match": {"system": ROOT, "user": "final-tag"},
     "reply": {"kind": "final", "answer": "forty two", "text": "I know it."}},
    code_rule("define", "words = context.split()\nk = len(words)", user="final-var-tag",
              iteration=0),
    {"name": "final-var-tag", "match": {"system": ROOT, "user": "final-var-tag"},
     "reply": {"kind": "final", "var": "k"}},
)  # fmt: skip


@pytest.mark.parametrize(
    ("query", "answer", "source", "turns"),
    [
        ("final-function", "len=11", "FINAL", 1),
        ("final-var-function", "22", "FINAL_VAR", 1),
        ("final-tag", "forty two", "FINAL", 1),
        ("final-var-tag", "2", "FINAL_VAR", 2),
    ],
)
async def test_final_and_final_var_end_the_run(
    redis_url: str, tmp_path: Path, query: str, answer: str, source: str, turns: int
) -> None:
    async with harness(redis_url, tmp_path, ENDINGS) as h:
        result = await h.rlm().acompletion("hello world", query)
    assert (result.answer, result.answer_source, len(result.iterations)) == (
        answer, source, turns,
    )  # fmt: skip
    assert result.stop_reason == "final"


async def test_a_run_that_never_finishes_stops_at_max_iterations_with_a_best_answer(
    redis_url: str, tmp_path: Path
) -> None:
    async with harness(redis_url, tmp_path, "never_finishes") as h:
        result = await h.rlm(max_iterations=3).acompletion(["a" * 10, "b" * 5], "anything")
    assert result.stop_reason == "max_iterations"
    assert result.answer == "Best answer so far: still counting."
    assert result.answer_source == "forced"
    assert len(result.iterations) == 3
    assert result.usage.calls == 4  # three turns and the last call
    assert "still working, iteration 2, context length 2" in (
        result.iterations[2].code_runs[0].result.stdout
    )


async def test_contexts_may_be_a_list_or_a_dict_and_are_described(
    redis_url: str, tmp_path: Path
) -> None:
    probe = scenario(
        "probe",
        code_rule("probe", "FINAL(type(context).__name__ + str(sorted(context)))"),
    )
    async with harness(redis_url, tmp_path, probe) as h:
        result = await h.rlm().acompletion({"b": "x" * 5, "a": "y"}, "q")
    assert result.answer == "dict['a', 'b']"
    events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
    assert events[0]["context_type"] == "dict"
    assert events[0]["context_chars"] == 6


# --- budgets -----------------------------------------------------------------------------

RUNAWAY = scenario(
    "runaway",
    code_rule(
        "root",
        "\n".join(
            [
                "done = 0",
                "try:",
                "    for i in range(1000):",
                "        llm_query(f'call {i}')",
                "        done += 1",
                "except LLMQueryError as exc:",
                "    print('stopped after', done, exc.code)",
            ]
        ),
    ),
    {"name": "sub", "match": {"system": "^$"}, "reply": {"kind": "text", "text": "ok"}},
)


async def test_a_runaway_run_is_stopped_by_its_sub_call_budget(
    redis_url: str, tmp_path: Path
) -> None:
    async with harness(redis_url, tmp_path, RUNAWAY) as h:
        rlm = h.rlm(budget=Budget(max_sub_calls=5))
        result = await rlm.acompletion("ctx", "loop forever")
    assert result.stop_reason == "budget_sub_calls"
    assert result.answer is None
    assert "sub-call budget of 5 calls spent" in result.stop_detail
    output = result.iterations[0].code_runs[0].result.stdout
    assert output.strip() == "stopped after 5 budget_exceeded"


async def test_a_token_budget_stops_a_run_that_never_finishes(
    redis_url: str, tmp_path: Path
) -> None:
    async with harness(redis_url, tmp_path, "never_finishes") as h:
        result = await h.rlm(max_iterations=50, budget=Budget(max_tokens=3000)).acompletion(
            "ctx", "q"
        )
    assert result.stop_reason == "budget_tokens"
    assert result.answer is None
    assert 1 <= len(result.iterations) < 50
    assert result.usage.total_tokens >= 3000


async def test_progress_events_reach_the_hook(redis_url: str, tmp_path: Path) -> None:
    async with harness(redis_url, tmp_path, "count_words") as h:
        await h.rlm().acompletion(make_text("whale", 3), "How often is the word 'whale' used?")
        names = [name for name, _ in h.events]
    assert names[0] == "run_start"
    assert names[-1] == "run_end"
    assert {"iteration_start", "iteration", "sub_call"} <= set(names)


async def test_runs_keep_the_trajectory_directory_within_its_bound(
    redis_url: str, tmp_path: Path
) -> None:
    """What earlier runs left past RLM_TRAJECTORY_MAX_BYTES is removed, oldest first, once a
    run starts; the run's own trajectory stays."""
    directory = tmp_path / "trajectories"
    directory.mkdir()
    left = []
    for age_s in (3000.0, 2000.0, 1000.0):  # 3 x 600 KiB against a bound of 1 MiB
        path = directory / f"earlier-{int(age_s)}.jsonl"
        path.write_bytes(b"x" * 600 * 1024)
        os.utime(path, (time.time() - age_s,) * 2)
        left.append(path)
    async with harness(redis_url, tmp_path, "count_words", trajectory_max_bytes=2**20) as h:
        result = await h.rlm().acompletion(
            make_text("whale", 3), "How often is the word 'whale' used?"
        )
    assert result.answer == "3"
    with contextlib.suppress(TimeoutError):  # pruned in a background thread
        await wait_until(lambda: not _exists(left[:2]))
    assert _exists(left) == [left[2]]  # the newest of them fits beside the run's own
    assert result.trajectory_path is not None
    assert read_trajectory(result.trajectory_path)[-1]["event"] == "run_end"


def _exists(paths: list[Path]) -> list[Path]:
    return [path for path in paths if path.exists()]


# --- a model stuck on one error; a forced answer that is a FINAL_VAR call -----------------


def _text_rule(name: str, text: str, **match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"system": ROOT, **match},
        "reply": {"kind": "text", "text": text},
    }


async def test_the_same_error_turn_after_turn_fails_the_run(redis_url: str, tmp_path: Path) -> None:
    from host_poller.rlm import RLMRunError

    stuck = scenario("stuck", code_rule("name-error", "print(magic)"))
    async with harness(redis_url, tmp_path, stuck, max_consecutive_errors=3) as h:
        with pytest.raises(RLMRunError) as caught:
            await h.rlm(max_iterations=20).acompletion("some context", "What is magic?")
        stats = h.fake_stats()
    message = str(caught.value)
    assert "stopped after 3 turns in a row" in message
    assert "NameError: name 'magic' is not defined" in message
    assert "RLM_MAX_CONSECUTIVE_ERRORS=3" in message
    assert stats["requests"] == 3  # no turn more than the limit, and no forced answer
    events = read_trajectory(caught.value.trajectory_path)  # type: ignore[arg-type]
    assert events[-1]["event"] == "error" and events[-1]["where"] == "repeated_error"


async def test_errors_that_change_or_stop_do_not_fail_the_run(
    redis_url: str, tmp_path: Path
) -> None:
    # A different error each turn (its message names the turn) is progress of a kind.
    changing = scenario(
        "changing",
        code_rule("finish", "FINAL('done')", min_iteration=4),
        code_rule("error", "raise ValueError('turn ${iteration}')"),
    )
    async with harness(redis_url, tmp_path, changing, max_consecutive_errors=2) as h:
        result = await h.rlm(max_iterations=10).acompletion("ctx", "Go on")
    assert (result.answer, result.stop_reason, len(result.iterations)) == ("done", "final", 5)


async def test_a_forced_final_var_of_nothing_is_no_answer(redis_url: str, tmp_path: Path) -> None:
    # The model works without errors, then at the last call names a variable that does not
    # exist: the run ends without an answer, never with the text "FINAL_VAR(magic)".
    forced = scenario(
        "forced",
        _text_rule("last", "FINAL_VAR(magic)", user="(?i)best final answer"),
        code_rule("work", "print(len(context))"),
    )
    async with harness(redis_url, tmp_path, forced) as h:
        result = await h.rlm(max_iterations=2).acompletion("ctx", "What is magic?")
    assert result.answer is None
    assert result.stop_reason == "max_iterations"
    assert "FINAL_VAR('magic')" in result.stop_detail
    assert "NameError" in result.stop_detail


async def test_a_forced_final_call_in_code_is_no_answer(redis_url: str, tmp_path: Path) -> None:
    forced = scenario(
        "forced-code",
        code_rule("last", "FINAL_VAR(total)", user="(?i)best final answer"),
        code_rule("work", "print(len(context))"),
    )
    async with harness(redis_url, tmp_path, forced) as h:
        result = await h.rlm(max_iterations=1).acompletion("ctx", "What is the total?")
    assert result.answer is None
    assert "the forced reply was code" in result.stop_detail


# --- the one-liner: no broker, a provider by the standard variables ------------------------

PROVIDER_KEY = "sk-one-liner-test-key"


@pytest.fixture
def standard_provider(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> Iterator[HostSettings]:
    """No broker; the scripted LLM as the provider of OPENAI_BASE_URL / OPENAI_API_KEY."""
    from fake_llm import FakeLLMServer

    for name in ("RLM_BROKER_URL", "RLM_TENANT_TOKEN", "RLM_LLM_PROFILES", "RLM_LLM_PROFILES_FILE",
                 "RLM_ROOT_PROFILE", "RLM_SUB_PROFILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RLM_REDIS_URL", redis_url)
    provider = load_scenario("count_words").model_copy(update={"api_key": PROVIDER_KEY})
    with FakeLLMServer(provider) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
        monkeypatch.setenv("RLM_MODEL", "fake-root")
        monkeypatch.setenv("RLM_SUB_MODEL", "fake-sub")
        yield HostSettings(environment="local", trajectory_dir=tmp_path / "trajectories")


async def test_the_python_api_starts_its_own_stack(standard_provider: HostSettings) -> None:
    rlm = EmbeddedRLM(settings=standard_provider)
    result = await rlm.acompletion(make_text("whale", 12), "How often is the word 'whale' used?")
    assert (result.answer, result.stop_reason) == ("12", "final")
    assert set(result.usage_by_model) == {"fake-root", "fake-sub"}


async def test_one_embedded_stack_for_the_runs_of_a_block(standard_provider: HostSettings) -> None:
    async with EmbeddedRLM(settings=standard_provider) as rlm:
        first = await rlm.acompletion(make_text("whale", 3), "How often is the word 'whale' used?")
        second = await rlm.acompletion(make_text("whale", 8), "How often is the word 'whale' used?")
        assert rlm._stack_settings is not None
        broker = rlm._stack_settings.broker_url
    assert (first.answer, second.answer) == ("3", "8")
    assert broker is not None and rlm._stack_settings is None


async def test_without_a_broker_or_a_stack_the_host_api_says_what_to_do(tmp_path: Path) -> None:
    from host_poller.rlm import RLMConfigError

    rlm = RLM(settings=HostSettings(environment="local", trajectory_dir=tmp_path))
    with pytest.raises(RLMConfigError, match=r"set RLM_BROKER_URL .* or use `rlm_cli\.RLM`"):
        await rlm.acompletion("ctx", "q")


def test_the_blocking_one_liner(standard_provider: HostSettings) -> None:
    result = EmbeddedRLM(settings=standard_provider).completion(
        make_text("whale", 5), "How often is the word 'whale' used?"
    )
    assert result.answer == "5"


def test_the_blocking_conversation_keeps_its_stack_and_repl(
    standard_provider: HostSettings,
) -> None:
    # The count_words scenario counts over `context`; each question runs on the same REPL
    # and the one embedded stack the conversation started (and stops at the end).
    rlm = EmbeddedRLM(settings=standard_provider)
    with rlm.conversation() as chat:
        first = chat.ask("How often is the word 'whale' used?", context=make_text("whale", 4))
        again = chat.ask("How often is the word 'whale' used?")
    assert (first.answer, again.answer) == ("4", "4")
    assert first.run_id == again.run_id
    with pytest.raises(RLMConfigError, match=r"with rlm\.conversation"):
        rlm.conversation().ask("q", context="ctx")


async def test_no_llm_at_all_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from host_poller.rlm import RLMConfigError

    for name in ("RLM_BROKER_URL", "RLM_LLM_PROFILES", "RLM_LLM_PROFILES_FILE", "OPENAI_BASE_URL",
                 "OPENAI_API_KEY", "RLM_MODEL", "RLM_SUB_MODEL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    rlm = EmbeddedRLM(settings=HostSettings(environment="local", trajectory_dir=tmp_path))
    with pytest.raises(RLMConfigError, match="no LLM is configured: set OPENAI_BASE_URL"):
        await rlm.acompletion("ctx", "q")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-no-model")
    with pytest.raises(RLMConfigError, match="no model is named: set RLM_MODEL") as caught:
        await rlm.acompletion("ctx", "q")
    assert "sk-no-model" not in str(caught.value)
