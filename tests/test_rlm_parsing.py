"""Reading the root model's replies, and the exec script's state merge."""

from __future__ import annotations

from host_poller.rlm import FinalTag, code_blocks, final_tag
from rlm_repl import changed_keys, merge_state


def test_repl_blocks_win_over_python_blocks() -> None:
    text = "a\n```python\nx = 1\n```\nb\n```repl\ny = 2\n```\n```repl\nz = 3\n```"
    assert code_blocks(text) == ["y = 2", "z = 3"]
    assert code_blocks("```python\nx = 1\n```") == ["x = 1"]
    assert code_blocks("no code") == []


def test_final_tags_outside_code_only() -> None:
    assert final_tag("```repl\nFINAL(x)\n```") is None
    assert final_tag("Done.\nFINAL(the answer is 4)") == FinalTag("FINAL", "the answer is 4")
    assert final_tag('FINAL("quoted")') == FinalTag("FINAL", "quoted")
    assert final_tag("FINAL_VAR(total)\n") == FinalTag("FINAL_VAR", "total")
    assert final_tag("I will call FINAL(x) later") is None


def test_merge_state_applies_changes_in_order_and_keeps_the_rest() -> None:
    parent = {"a": 1, "b": 2, "mine": "kept"}
    sent = {"a": 1, "b": 2}
    merge_state(parent, sent, {"a": 10, "b": 2})
    merge_state(parent, sent, {"a": 20, "c": 3})
    merge_state(parent, sent, None)
    assert parent == {"a": 20, "b": 2, "mine": "kept", "c": 3}
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == {"b": 3, "c": 4}
