"""Turn a matched rule's reply into the assistant's text.

Templates use `string.Template` (`$name` / `${name}`) so that code with braces needs no
escaping: the names are the matched regexes' named groups plus `model` and `iteration`.
In the `pattern` of `count` and `find`, substituted values are regex-escaped.
"""

from __future__ import annotations

import re
from string import Template

from fake_llm.scenario import (
    CodeReply,
    Conversation,
    CountReply,
    EchoLengthReply,
    FinalReply,
    FindReply,
    MatchResult,
    Scope,
    TextReply,
    join_lines,
)


def _fill(template: str, values: dict[str, str]) -> str:
    return Template(template).safe_substitute(values)


def _scope_text(scope: Scope, conv: Conversation, matched: MatchResult) -> str:
    if scope == "conversation":
        return conv.all_user
    if scope == "message":
        return conv.last_user
    return conv.last_user[matched.user_match_end :]


def render_reply(conv: Conversation, matched: MatchResult) -> str:
    """The assistant text for `conv` under the rule that matched it."""
    values = {**matched.groups, "model": conv.model, "iteration": str(conv.iteration)}
    escaped = {k: re.escape(v) for k, v in values.items()}
    reply = matched.rule.reply
    if isinstance(reply, TextReply):
        return _fill(join_lines(reply.text), values)
    if isinstance(reply, CodeReply):
        prose = _fill(join_lines(reply.text), values)
        block = f"```repl\n{_fill(join_lines(reply.code), values)}\n```"
        return f"{prose}\n\n{block}" if prose else block
    if isinstance(reply, FinalReply):
        prose = _fill(join_lines(reply.text), values)
        if reply.var is not None:
            tag = f"FINAL_VAR({reply.var})"
        else:
            tag = f"FINAL({_fill(join_lines(reply.answer or ''), values)})"
        return f"{prose}\n{tag}" if prose else tag
    if isinstance(reply, CountReply):
        flags = re.IGNORECASE if reply.ignore_case else 0
        pattern = _fill(reply.pattern, escaped)
        source = _scope_text(reply.scope, conv, matched)
        return str(len(re.findall(pattern, source, flags)))
    if isinstance(reply, FindReply):
        flags = re.IGNORECASE if reply.ignore_case else 0
        pattern = _fill(reply.pattern, escaped)
        found = re.search(pattern, _scope_text(reply.scope, conv, matched), flags)
        return reply.none if found is None else str(found.group(reply.group))
    if isinstance(reply, EchoLengthReply):
        return str(len(_scope_text(reply.scope, conv, matched)))
    raise TypeError(f"unknown reply {reply!r}")  # pragma: no cover - the union is closed
