"""Several contexts in one run, and conversations: several questions on one REPL that keeps
its variables (real runs on the local stack; the scripted LLM matches on what the root model
is shown, so each rule also checks the prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from host_poller.rlm import Budget, Contexts, RLMConfigError
from host_poller.rlm.trajectory import read_trajectory
from tests.support.runs import scripted_stack

pytestmark = pytest.mark.anyio

BOOK = "whale ship whale sea whale"
LOG = "ship ship harbour"
SCENARIO: dict[str, Any] = {
    "name": "conversation",
    "rules": [
        {
            # Turn 2: the REPL still holds `whales` from turn 1, and the new context is there.
            "name": "follow-up",
            "match": {
                "user": r"This is query 2 of a conversation.*This turn added `context_1`",
                "system": r"`context_1`: a str of 17 characters",
                "any_user": r'Query 1: "How many whales\?"',
            },
            "reply": {
                "kind": "code",
                "code": ["FINAL(f\"{whales} whales, {context_1.count('ship')} ships\")"],
            },
        },
        {
            "name": "third-no-new-context",
            "match": {"user": r'The query: "Sum them"\s+This is query 3 of a conversation'},
            "reply": {"kind": "code", "code": ["FINAL(str(whales + context_1.count('ship')))"]},
        },
        {
            "name": "first",
            "match": {"user": r'The query: "How many whales\?"'},
            "reply": {"kind": "code", "code": ["whales = context.count('whale')\nFINAL(whales)"]},
        },
        {
            "name": "message-list",
            "match": {"system": r"a list of 3 chat messages \(user: 2, assistant: 1\)"},
            "reply": {"kind": "code", "code": ["FINAL(context[-1]['content'].upper())"]},
        },
        {
            "name": "two-contexts",
            "match": {
                "system": r"`context`: \(also `context_0`\) a str of 26.*`context_1`: a str of 17",
                "user": "Compare",
            },
            "reply": {
                "kind": "code",
                "code": ["FINAL(f'{context_0 is context} {len(context_0)} {len(context_1)}')"],
            },
        },
    ],
}


async def test_one_run_over_several_contexts(redis_url: str, tmp_path: Path) -> None:
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        result = await run.rlm().acompletion(Contexts(BOOK, LOG), "Compare")
    assert result.answer == "True 26 17"


async def test_a_message_list_is_a_context(redis_url: str, tmp_path: Path) -> None:
    chat = [
        {"role": "user", "content": "Where is the ship?"},
        {"role": "assistant", "content": "In the harbour."},
        {"role": "user", "content": "moored at pier 9"},
    ]
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        result = await run.rlm().acompletion(chat, "Where exactly?")
        with pytest.raises(RLMConfigError, match="messages"):
            await run.rlm().acompletion([{"role": "user"}], "Where exactly?")
    assert result.answer == "MOORED AT PIER 9"


@pytest.mark.parametrize("environment", ["local", "pyodide"])
async def test_a_conversation_keeps_the_repl_and_adds_contexts(
    redis_url: str, tmp_path: Path, environment: str
) -> None:
    async with scripted_stack(redis_url, tmp_path, SCENARIO, environment=environment) as run:
        async with run.rlm().conversation() as chat:
            first = await chat.aask("How many whales?", context=BOOK)
            second = await chat.aask("And ships?", context=LOG)
            third = await chat.aask("Sum them")
            run_id = chat.run_id
        assert chat.turns == 3
    assert (first.answer, second.answer, third.answer) == ("3", "3 whales, 2 ships", "5")
    # Each turn reports its own usage (one root call each here); one run id spans them all.
    assert [r.usage.calls for r in (first, second, third)] == [1, 1, 1]
    assert first.run_id == second.run_id == third.run_id == run_id
    assert first.trajectory_path is not None
    events = [e["event"] for e in read_trajectory(first.trajectory_path)]
    assert events.count("run_start") == 1 and events.count("run_end") == 1
    assert events.count("turn_end") == 3
    run_end = next(e for e in read_trajectory(first.trajectory_path) if e["event"] == "run_end")
    assert run_end["usage"]["calls"] == 3 and run_end["turns"] == 3


async def test_a_conversations_budget_spans_its_questions(redis_url: str, tmp_path: Path) -> None:
    # One token: the first question's one root call spends it (the check is before each
    # turn), so the second question starts with the budget already spent.
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        async with run.rlm(budget=Budget(max_tokens=1)).conversation() as chat:
            first = await chat.aask("How many whales?", context=BOOK)
            second = await chat.aask("And ships?", context=LOG)
    assert (first.answer, first.stop_reason) == ("3", "final")
    assert (second.answer, second.stop_reason) == (None, "budget_tokens")
    assert second.usage.calls == 0


async def test_a_conversation_refuses_a_first_question_without_context(
    redis_url: str, tmp_path: Path
) -> None:
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        async with run.rlm().conversation() as chat:
            with pytest.raises(RLMConfigError, match="needs a context"):
                await chat.aask("How many whales?")
            # The refusal opened nothing: a right first question still works.
            assert (await chat.aask("How many whales?", context=BOOK)).answer == "3"
        with pytest.raises(RLMConfigError, match="closed"):
            await chat.aask("Sum them")


def test_contexts_needs_one_and_checks_each() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Contexts()
    from host_poller.rlm.session import validate_contexts

    with pytest.raises(RLMConfigError):
        validate_contexts(Contexts("ok", 3))  # type: ignore[arg-type]
