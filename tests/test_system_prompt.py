"""`RLM(system_prompt=...)`: the caller's own instructions for the root model, with the
context's description filled in; sub-RLMs keep the built-in ones (a real run on the local
stack, the scripted LLM matching on the system prompt it receives)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from host_poller.rlm.prompts import system_prompt
from tests.support.runs import scripted_stack

pytestmark = pytest.mark.anyio

CUSTOM = "You are a careful auditor. The data: {context_info} Depth {depth}. Keep {braces}."
CHILD = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"
SCENARIO: dict[str, Any] = {
    "name": "custom-prompt",
    "rules": [
        {
            "name": "child-built-in",
            "match": {"system": CHILD, "iteration": 0},
            "reply": {"kind": "code", "code": ["FINAL('built-in child')"]},
        },
        {
            "name": "auditor",
            "match": {"system": "You are a careful auditor. The data: a str of 11 characters"},
            "reply": {
                "kind": "code",
                "code": ["FINAL('audited: ' + rlm_query('check'))"],
            },
        },
    ],
}


def test_the_custom_prompt_gets_the_context_and_depth_and_keeps_other_braces() -> None:
    text = system_prompt("hello world", depth=0, max_depth=2, output_chars=100, custom=CUSTOM)
    assert text.startswith("You are a careful auditor. The data: a str of 11 characters")
    assert text.endswith("Depth 0. Keep {braces}.")
    built_in = system_prompt("hello world", depth=0, max_depth=2, output_chars=100)
    assert "You are the root of a Recursive Language Model" in built_in


async def test_a_run_uses_the_callers_instructions_and_sub_rlms_the_built_in_ones(
    redis_url: str, tmp_path: Path
) -> None:
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        rlm = run.rlm(system_prompt=CUSTOM)
        result = await rlm.acompletion("hello world", "Audit it")
    assert result.answer == "audited: built-in child"
