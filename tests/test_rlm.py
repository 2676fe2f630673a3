"""Whole RLM runs: real broker, real Redis, the real poller, the openai SDK against the
scripted LLM, and the "local" environment."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_llm import load_scenario
from host_poller.llm.profiles import LLMSettings
from host_poller.llm.types import LLMClient
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RLM, Budget, RunBudgets, RunHooks, read_trajectory
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig

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
    async with harness(redis_url, tmp_path, "depth2", sub_rlm_max_depth=1) as h:
        result = await h.rlm(max_depth=2).acompletion(text, "How often is the word 'whale' used?")
    events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
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
