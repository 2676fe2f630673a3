"""Reading the root model's reply: ```repl code blocks and the FINAL/FINAL_VAR text tags.

Code goes in ```repl blocks (the RLM papers' convention); when a reply has none, ```python
blocks are accepted, since models often write those. The text tags count only outside code
blocks, at the start of a line: inside code, `FINAL(x)` is the function of the REPL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_BLOCK = re.compile(r"```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)\n?```", re.DOTALL)
_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\((?P<arg>.*?)\)\s*$", re.MULTILINE)
_FINAL = re.compile(r"^\s*FINAL\((?P<arg>.*)\)\s*$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[str]:
    """The code of the ```repl blocks of `text`, else of its ```python blocks, in order."""
    blocks = [(m["lang"].lower(), m["code"]) for m in _BLOCK.finditer(text)]
    repl = [code for lang, code in blocks if lang == "repl"]
    if repl:
        return repl
    return [code for lang, code in blocks if lang in ("python", "py")]


@dataclass(frozen=True)
class FinalTag:
    """A final answer given as text: FINAL(answer) or FINAL_VAR(variable)."""

    kind: Literal["FINAL", "FINAL_VAR"]
    argument: str


def final_tag(text: str) -> FinalTag | None:
    """The FINAL_VAR or FINAL tag outside code blocks, if any (FINAL_VAR wins)."""
    prose = _BLOCK.sub("", text)
    found_var = _FINAL_VAR.search(prose)
    if found_var:
        return FinalTag("FINAL_VAR", found_var["arg"].strip().strip("'\"` "))
    found = _FINAL.search(prose)
    if found:
        return FinalTag("FINAL", _unquote(found["arg"].strip()))
    return None


def _unquote(text: str) -> str:
    for quote in ('"""', "'''", '"', "'"):
        if len(text) >= 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote) : -len(quote)]
    return text
