"""The shipped scenarios do real RLM work: a minimal REPL loop runs them to the right answer.

The loop here is a test harness only (trusted code, exec in-process); it follows the
conventions the real RLM loop uses (docs/fake-llm.md): the root system prompt carries the
marker and `depth: N`, sub-calls are a lone user message, `rlm_query(prompt)` starts a child
run whose `context` is the prompt.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from fake_llm import ROOT_MODEL, SUB_MODEL, FakeLLMServer

MARKER = "You are the root of a Recursive Language Model"
FENCE = re.compile(r"```repl\n(.*?)```", re.DOTALL)
TAG = re.compile(r"^\s*(FINAL_VAR|FINAL)\((.*)\)\s*$", re.MULTILINE | re.DOTALL)


class _Final(Exception):
    def __init__(self, value: object) -> None:
        self.value = value


class MiniRLM:
    """Just enough of an RLM loop to drive a scenario end to end."""

    def __init__(self, base_url: str, max_iterations: int = 5) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=3)
        self.max_iterations = max_iterations
        self.state: dict[str, Any] = {}

    def llm_query(self, prompt: str) -> str:
        reply = self.client.chat.completions.create(
            model=SUB_MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return reply.choices[0].message.content or ""

    def run(self, context: object, query: str, depth: int = 0) -> str:
        system = f"{MARKER}. depth: {depth}. Write ```repl blocks; end with FINAL(answer)."
        messages: list[dict[str, str]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Query: {query}"},
        ]
        answer: dict[str, Any] = {"content": "", "ready": False}
        namespace: dict[str, Any] = {"context": context, "answer": answer, "state": self.state}

        def final(value: object) -> None:
            raise _Final(value)

        def final_var(name: str) -> None:
            raise _Final(namespace[name])

        def rlm_query(prompt: str) -> str:
            return self.run(prompt, "(from the parent)", depth + 1)

        def batched(prompts: list[str]) -> list[str]:
            with ThreadPoolExecutor(16) as pool:
                return list(pool.map(self.llm_query, prompts))

        namespace.update(
            llm_query=self.llm_query, llm_query_batched=batched, rlm_query=rlm_query,
            FINAL=final, FINAL_VAR=final_var,
        )  # fmt: skip
        for _ in range(self.max_iterations):
            reply = self.client.chat.completions.create(model=ROOT_MODEL, messages=messages)  # type: ignore[arg-type]
            text = reply.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": text})
            output = io.StringIO()
            for code in FENCE.findall(text):
                try:
                    with contextlib.redirect_stdout(output):
                        exec(code, namespace)
                except _Final as done:
                    return str(done.value)
                if answer["ready"]:
                    return str(answer["content"])
            tag = TAG.search(FENCE.sub("", text))
            if tag:
                kind, arg = tag.groups()
                return str(namespace[arg.strip()]) if kind == "FINAL_VAR" else arg
            messages.append({"role": "user", "content": f"REPL output:\n{output.getvalue()}"})
        messages.append({"role": "user", "content": "Please provide your final answer now."})
        reply = self.client.chat.completions.create(model=ROOT_MODEL, messages=messages)  # type: ignore[arg-type]
        return "max_iterations: " + (reply.choices[0].message.content or "")


def word_text(seed: int, words: int) -> tuple[str, int]:
    rng = random.Random(seed)
    vocab = ["apple", "apples", "pineapple", "pear", "plum", "the", "Apple", "fig"]
    picked = [rng.choice(vocab) for _ in range(words)]
    lines = [" ".join(picked[i : i + 12]) for i in range(0, words, 12)]
    return "\n".join(lines), picked.count("apple")


@pytest.fixture
def text_and_count() -> tuple[str, int]:
    return word_text(seed=7, words=5000)  # about 25,000 characters: 6-7 chunks


QUERY = "How many times does the word 'apple' appear in the context?"


@contextlib.contextmanager
def running(scenario: str) -> Iterator[tuple[FakeLLMServer, MiniRLM]]:
    with FakeLLMServer(scenario) as fake:
        rlm = MiniRLM(fake.base_url)
        try:
            yield fake, rlm
        finally:
            rlm.client.close()


@pytest.mark.parametrize("scenario", ["count_words", "sequential", "answer_dict"])
def test_counting_scenarios_give_the_true_count(
    scenario: str, text_and_count: tuple[str, int]
) -> None:
    text, count = text_and_count
    with running(scenario) as (fake, rlm):
        assert rlm.run(text, QUERY) == str(count)
        hits = fake.stats()["rule_hits"]
    assert hits["sub-count"] == len(text) // 4000 + 1
    assert sum(v for k, v in hits.items() if k.startswith("root")) == (
        1 if scenario == "answer_dict" else 2
    )


def test_count_words_with_a_list_context(text_and_count: tuple[str, int]) -> None:
    text, count = text_and_count
    with running("count_words") as (_, rlm):
        assert rlm.run(text.splitlines(), QUERY) == str(count)


def test_flaky_scenario_succeeds_through_retries(text_and_count: tuple[str, int]) -> None:
    text, count = text_and_count
    with running("flaky_count_words") as (fake, rlm):
        assert rlm.run(text, QUERY) == str(count)
        assert fake.stats()["failures_sent"] == 3


def test_needle_is_found() -> None:
    rng = random.Random(3)
    lines = [f"line {i}: " + " ".join(rng.choice(["a", "bb", "ccc"]) for _ in range(20))
             for i in range(2000)]  # fmt: skip
    lines[1234] = "Somewhere here: the magic number is 4817302, remember it."
    with running("needle") as (fake, rlm):
        assert rlm.run("\n".join(lines), "What is the magic number?") == "4817302"
        assert fake.stats()["rule_hits"]["sub-find"] > 10


def test_depth2_children_count_halves(text_and_count: tuple[str, int]) -> None:
    text, count = text_and_count
    with running("depth2") as (fake, rlm):
        assert rlm.run(text, QUERY) == str(count)
        hits = fake.stats()["rule_hits"]
    assert hits["child-count"] == hits["child-finish"] == 2
    assert hits["root-split"] == hits["root-finish"] == 1
    assert hits["sub-count"] >= 4
    assert rlm.state == {"children": 2}


def test_never_finishes_hits_max_iterations() -> None:
    with running("never_finishes") as (fake, rlm):
        answer = rlm.run("some context", "anything")
        hits = fake.stats()["rule_hits"]
    assert answer == "max_iterations: Best answer so far: still counting."
    assert hits == {"keep-going": rlm.max_iterations, "best-answer": 1}
