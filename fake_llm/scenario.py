"""The scenario file of the scripted LLM: ordered rules, each a match and a reply.

Format (JSON, documented in docs/fake-llm.md)::

    {"name": "...", "models": ["fake-root", "fake-sub"], "faults": {...},
     "rules": [{"name": "...", "match": {...}, "reply": {...}, "faults": {...}}]}

The first rule whose `match` accepts the conversation gives the reply. Strings that hold
code or text may be given as a list of lines.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Lines = str | list[str]

#: The model names the scripted LLM answers to by default.
ROOT_MODEL = "fake-root"
SUB_MODEL = "fake-sub"


def join_lines(value: Lines) -> str:
    return value if isinstance(value, str) else "\n".join(value)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Faults(_Model):
    """Failures injected before a reply: the first `fail_first_n` requests fail."""

    fail_first_n: int = Field(default=0, ge=0, description="Requests answered with `status`.")
    status: int = Field(default=500, ge=400, le=599, description="Status of the failures.")
    retry_after_s: float | None = Field(
        default=None, ge=0, description="Retry-After (and retry-after-ms) on the failures."
    )
    delay_s: float = Field(default=0.0, ge=0, description="Delay before each successful reply.")


class Match(_Model):
    """What a rule accepts; every field set must hold. Regexes use re.search with DOTALL."""

    model: str | None = Field(default=None, description="Glob on the request's model name.")
    system: str | None = Field(
        default=None, description="Regex on the system prompt ('' when there is none)."
    )
    user: str | None = Field(default=None, description="Regex on the last user message.")
    any_user: str | None = Field(
        default=None, description="Regex on all user messages, joined by newlines."
    )
    iteration: int | None = Field(
        default=None, ge=0, description="Number of assistant messages so far."
    )
    min_iteration: int | None = Field(default=None, ge=0)
    max_iteration: int | None = Field(default=None, ge=0)

    @field_validator("system", "user", "any_user")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            re.compile(value, re.DOTALL)
        return value


Scope = Literal["after_match", "message", "conversation"]


class TextReply(_Model):
    kind: Literal["text"] = "text"
    text: Lines


class CodeReply(_Model):
    """A ```repl block, optionally after some prose."""

    kind: Literal["code"] = "code"
    code: Lines
    text: Lines = ""


class FinalReply(_Model):
    """`FINAL(answer)`, or `FINAL_VAR(var)` when `var` is set."""

    kind: Literal["final"] = "final"
    answer: Lines | None = None
    var: str | None = None
    text: Lines = ""


class CountReply(_Model):
    """The number of matches of `pattern` in the scope text."""

    kind: Literal["count"] = "count"
    pattern: str
    ignore_case: bool = False
    scope: Scope = "after_match"


class FindReply(_Model):
    """The first match (or its `group`) of `pattern` in the scope text, else `none`."""

    kind: Literal["find"] = "find"
    pattern: str
    group: int | str = 0
    none: str = "NONE"
    ignore_case: bool = False
    scope: Scope = "after_match"


class EchoLengthReply(_Model):
    """The length in characters of the scope text."""

    kind: Literal["echo_length"] = "echo_length"
    scope: Scope = "after_match"


Reply = Annotated[
    TextReply | CodeReply | FinalReply | CountReply | FindReply | EchoLengthReply,
    Field(discriminator="kind"),
]


class Rule(_Model):
    name: str
    match: Match = Match()
    reply: Reply
    faults: Faults | None = None


class Scenario(_Model):
    name: str
    description: str = ""
    models: list[str] = Field(default_factory=lambda: [ROOT_MODEL, SUB_MODEL])
    faults: Faults | None = None
    api_key: str | None = Field(
        default=None, description="When set, other bearer tokens get 401 (echoing the token)."
    )
    rules: list[Rule]

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        return rules


@dataclass(frozen=True)
class Conversation:
    """The parts of a chat request the rules look at."""

    model: str
    system: str
    last_user: str
    all_user: str
    iteration: int

    @classmethod
    def from_messages(cls, model: str, messages: list[dict[str, Any]]) -> Conversation:
        def text(message: dict[str, Any]) -> str:
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")

        system = "\n".join(text(m) for m in messages if m.get("role") in ("system", "developer"))
        users = [text(m) for m in messages if m.get("role") == "user"]
        return cls(
            model=model,
            system=system,
            last_user=users[-1] if users else "",
            all_user="\n".join(users),
            iteration=sum(1 for m in messages if m.get("role") == "assistant"),
        )


@dataclass(frozen=True)
class MatchResult:
    """A rule that matched, the named groups of its regexes and its `user` match's end."""

    rule: Rule
    groups: dict[str, str]
    user_match_end: int


def _search(pattern: str | None, text: str, groups: dict[str, str]) -> re.Match[str] | bool | None:
    if pattern is None:
        return True
    found = re.search(pattern, text, re.DOTALL)
    if found is None:
        return None
    groups.update({k: v for k, v in found.groupdict().items() if v is not None})
    return found


def match_rule(scenario: Scenario, conv: Conversation) -> MatchResult | None:
    """The first rule of `scenario` accepting `conv`, or None."""
    for rule in scenario.rules:
        m = rule.match
        if m.model is not None and not fnmatch.fnmatchcase(conv.model, m.model):
            continue
        if m.iteration is not None and conv.iteration != m.iteration:
            continue
        if m.min_iteration is not None and conv.iteration < m.min_iteration:
            continue
        if m.max_iteration is not None and conv.iteration > m.max_iteration:
            continue
        groups: dict[str, str] = {}
        if not _search(m.system, conv.system, groups):
            continue
        if not _search(m.any_user, conv.all_user, groups):
            continue
        user = _search(m.user, conv.last_user, groups)
        if not user:
            continue
        end = user.end() if isinstance(user, re.Match) else 0
        return MatchResult(rule=rule, groups=groups, user_match_end=end)
    return None


_SCENARIO_PACKAGE = "fake_llm.scenarios"


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package."""
    files = resources.files(_SCENARIO_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A scenario from a file path, or by the name of a shipped one."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files(_SCENARIO_PACKAGE).joinpath(f"{name_or_path}.json")
        if not resource.is_file():
            raise FileNotFoundError(
                f"no scenario file {name_or_path!s} and no shipped scenario of that name "
                f"(shipped: {', '.join(shipped_scenarios())})"
            )
        text = resource.read_text(encoding="utf-8")
    return Scenario.model_validate(json.loads(text))
