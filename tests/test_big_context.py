"""A 35 MB context answers in every environment: the root splits it into 71 chunks of ~500 KB
and counts a word in each with one `llm_query_batched` (35 MB of prompts, more than twice the
broker's 16 MiB body bound, so the batch goes in slices), then sums. Real runs on the local
stack; the scripted LLM counts the word in each chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.runs import scripted_stack

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

CHUNKS = 71
SCENARIO: dict[str, Any] = {
    "name": "big-context",
    "rules": [
        {
            "name": "root-count",
            "match": {"system": "You are the root of a Recursive Language Model", "iteration": 0},
            "reply": {
                "kind": "code",
                "code": [
                    f"size = len(context) // {CHUNKS} + 1",
                    "chunks = [context[i:i + size] for i in range(0, len(context), size)]",
                    "ask = \"Count occurrences of the word 'whale' in the text below. Reply with "
                    'the integer only.\\n"',
                    "answers = llm_query_batched([ask + chunk for chunk in chunks])",
                    "FINAL(f'{len(chunks)} chunks, {sum(int(a) for a in answers)} whales')",
                ],
            },
        },
        {
            "name": "sub-count",
            "match": {"system": "^$", "user": "^Count occurrences of the word 'whale'"},
            "reply": {"kind": "count", "pattern": "\\bwhale\\b"},
        },
    ],
}


def _big_context() -> str:
    """35 MB of text holding "whale" exactly 700 times, never cut by a chunk boundary."""
    line = "the sea was calm and the crew slept below deck while the ship drifted on " * 4
    lines = [line] * 120_000
    for index in range(0, 120_000, 120_000 // 700)[:700]:
        lines[index] = line + "whale"
    return "\n".join(lines)


@pytest.fixture(scope="module")
def big_context() -> str:
    text = _big_context()
    assert len(text) > 35_000_000
    return text


@pytest.mark.parametrize("environment", ["local", "command", "pyodide", "remote"])
async def test_a_35_mb_context_answers(
    redis_url: str, tmp_path: Path, big_context: str, environment: str
) -> None:
    async with scripted_stack(redis_url, tmp_path, SCENARIO, environment=environment) as run:
        result = await run.rlm(max_depth=1).acompletion(big_context, "How many whales?")
    assert result.answer == f"{CHUNKS} chunks, 700 whales", result.stop_detail
    assert result.usage.calls == CHUNKS + 1  # every chunk's call and the root's, counted
