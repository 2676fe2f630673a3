"""What the root model is told: the system prompt, each turn's feedback, the last call.

The scripted LLM's scenarios match two markers of the system prompt: the sentence
"You are the root of a Recursive Language Model" and the line "depth: N" (N >= 1 for a
sub-RLM). Keep both when editing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from host_poller.llm.types import Message
from host_poller.rlm.types import Context
from rlm_wire.runtime_models import ExecutionResult

_MAX_LISTED_CHUNKS = 20

_SYSTEM = """\
You are the root of a Recursive Language Model (RLM): you answer a query about a context \
that is too large to read at once, by writing Python code that runs in a REPL.
depth: {depth}

The REPL holds:
- `context`: {context_info}
- `llm_query(prompt, model=None) -> str`: ask a language model (it can read about \
500,000 characters at once); use it on chunks of the context.
- `llm_query_batched(prompts, model=None) -> list[str]`: many llm_query calls run in \
parallel; answers come back in prompt order. Much faster than a loop of llm_query.
- `rlm_query(prompt, model=None) -> str` and `rlm_query_batched(prompts)`: like llm_query, \
but answered by a recursive RLM with its own REPL{rlm_note}.
- `state`: a dict of JSON values shared with your sub-RLMs: they start from it, and what \
they change is merged back when they return (a value that is not JSON raises StateError).
- `SHOW_VARS()`: lists the variables you have defined.
- `print(...)`: you see the output of your code, cut to {output_chars} characters. As in a \
Python REPL, the value of a bare expression on the last line of a block is printed too.
A failed call raises LLMQueryError (it never returns an error text), with `code` and \
`message`; for a batched call also `index` (the first failed prompt) and `partial` (the \
answers in prompt order, None where a prompt failed).
Variables persist between code blocks.

Write code in ```repl blocks, one or more per reply; you get their output back. Look at \
the context before answering, split it into chunks, use the sub-LLMs, and build up the \
answer in variables.

When you are done, give the final answer in one of these ways:
- call `FINAL(answer)` or `FINAL_VAR("variable_name")` in a ```repl block (FINAL_VAR takes \
the name of a variable you defined; any other name raises NameError),
- or set `answer["content"] = ...` and `answer["ready"] = True` in a ```repl block,
- or write FINAL(your answer) or FINAL_VAR(variable_name) on its own line, outside code.
Do not finish before you have actually looked at the context."""


def describe_context(context: Context) -> str:
    """Type, total length and chunk lengths of `context`, for the system prompt."""
    if isinstance(context, str):
        return f"a str of {len(context):,} characters."
    if isinstance(context, list) and context and isinstance(context[0], dict):
        messages = [m for m in context if isinstance(m, dict)]
        lengths = [len(m["content"]) for m in messages]
        roles = ", ".join(f"{r}: {n}" for r, n in Counter(m["role"] for m in messages).items())
        listed = ", ".join(f"{n:,}" for n in lengths[:_MAX_LISTED_CHUNKS])
        more = f", ... ({len(lengths) - _MAX_LISTED_CHUNKS} more)" if len(lengths) > 20 else ""
        return (
            f"a list of {len(messages)} chat messages ({roles}), each a dict with 'role' and "
            f"'content'; {sum(lengths):,} characters of content in all; content lengths: "
            f"[{listed}{more}]."
        )
    if isinstance(context, list):
        lengths = [len(str(item)) for item in context]
        listed = ", ".join(f"{n:,}" for n in lengths[:_MAX_LISTED_CHUNKS])
        more = f", ... ({len(lengths) - _MAX_LISTED_CHUNKS} more)" if len(lengths) > 20 else ""
        return (
            f"a list of {len(context)} str chunks, {sum(lengths):,} characters in all; "
            f"chunk lengths: [{listed}{more}]."
        )
    keys = list(context)
    lengths = [len(str(context[k])) for k in keys]
    listed = ", ".join(f"{k!r}: {n:,}" for k, n in list(zip(keys, lengths, strict=True))[:20])
    more = f", ... ({len(keys) - _MAX_LISTED_CHUNKS} more)" if len(keys) > 20 else ""
    return (
        f"a dict of {len(keys)} keys, {sum(lengths):,} characters of values in all; "
        f"value lengths: {{{listed}{more}}}."
    )


def describe_contexts(context: Context, more: Sequence[Context] = ()) -> str:
    """`context` described, then one line per further context (`context_1`, ...)."""
    if not more:
        return describe_context(context)
    lines = [f"(also `context_0`) {describe_context(context)}"]
    for index, extra in enumerate(more[:_MAX_LISTED_CHUNKS], start=1):
        lines.append(f"- `context_{index}`: {describe_context(extra)}")
    if len(more) > _MAX_LISTED_CHUNKS:
        lines.append(
            f"- ... and {len(more) - _MAX_LISTED_CHUNKS} more, up to `context_{len(more)}`"
        )
    return "\n".join(lines)


def system_prompt(
    context: Context,
    *,
    depth: int,
    max_depth: int,
    output_chars: int,
    custom: str | None = None,
    more_contexts: Sequence[Context] = (),
    tools: str | None = None,
) -> str:
    """The root's instructions: the built-in ones, or `custom` with its `{context_info}` and
    `{depth}` filled in (only those: other braces in it stay as written). `more_contexts` are
    bound as `context_1`, `context_2`, ... next to `context`. `tools` (the run's host-side
    tools, `host_poller.rlm.tools.Toolbox.listing`) ends the prompt, or fills `{tools}` in a
    custom one that has it."""
    context_info = describe_contexts(context, more_contexts)
    if custom is not None:
        filled = custom.replace("{context_info}", context_info)
        filled = filled.replace("{depth}", str(depth))
        if "{tools}" in filled:
            return filled.replace("{tools}", tools or "")
        return f"{filled}\n\n{tools}" if tools else filled
    recursive = depth + 1 < max_depth
    rlm_note = (
        ""
        if recursive
        else '. Not at this depth: here they raise LLMQueryError (code "max_depth"); use llm_query'
    )
    text = _SYSTEM.format(
        depth=depth,
        context_info=context_info,
        rlm_note=rlm_note,
        output_chars=f"{output_chars:,}",
    )
    return f"{text}\n\n{tools}" if tools else text


def first_prompt(query: str) -> str:
    return (
        f'The query: "{query}"\n\n'
        "You have not looked at the context yet. Start by exploring it in a ```repl block. "
        "Your next action:"
    )


def earlier_turn_messages(history: Sequence[tuple[str, str | None]], limit: int) -> list[Message]:
    """A conversation's earlier turns, as the root sees them: each query and its answer."""
    messages: list[Message] = []
    for number, (query, answer) in enumerate(history, start=1):
        said = truncate(answer, limit) if answer is not None else "(no answer was found)"
        messages.append({"role": "user", "content": f'Query {number}: "{query}"'})
        messages.append({"role": "assistant", "content": f"Answer to query {number}: {said}"})
    return messages


def follow_up_prompt(query: str, turn: int, new_contexts: Sequence[int]) -> str:
    """The first prompt of a conversation's later turn: the REPL still holds its variables."""
    added = ", ".join(f"`context_{i}`" for i in new_contexts)
    news = f" This turn added {added} (described above)." if added else ""
    return (
        f'The query: "{query}"\n\n'
        f"This is query {turn} of a conversation on the same REPL: the variables you defined "
        f"for the earlier queries are still there (SHOW_VARS() lists them).{news} "
        "Your next action:"
    )


def next_prompt(query: str) -> str:
    return (
        f'Continue with the query: "{query}". Use the REPL and sub-LLMs as needed, and '
        "finish with FINAL(...) or FINAL_VAR(...) once you have the answer. Your next action:"
    )


def no_code_prompt(query: str) -> str:
    return (
        "Your reply had no ```repl block and no FINAL(...). Write code in a ```repl block, "
        "or give the final answer.\n\n" + next_prompt(query)
    )


def last_call_prompt(query: str) -> str:
    return (
        "You have used all your iterations. Give your best final answer to the query "
        f'"{query}" now, as FINAL(your answer) on its own line, using what you found so far.'
    )


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit:,} more characters cut ...]"


def format_execution(code: str, result: ExecutionResult, limit: int) -> str:
    """One code block's feedback: the code, then its output (truncated), then its error."""
    parts = [result.stdout]
    if result.stderr:
        parts.append(result.stderr)
    if result.error is not None:
        parts.append(result.error.traceback or f"{result.error.type}: {result.error.message}")
    if result.state_lost:
        parts.append("[the sandbox was restarted: variables were lost]")
    output = "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts).rstrip("\n")
    return (
        f"Code executed:\n```python\n{code}\n```\n\n"
        f"REPL output:\n{truncate(output, limit) if output else '(no output)'}"
    )


def feedback_messages(
    reply: str, runs: Sequence[tuple[str, ExecutionResult]], query: str, limit: int
) -> list[Message]:
    """The assistant reply and the user turn that answers it."""
    if not runs:
        return [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": no_code_prompt(query)},
        ]
    blocks = "\n\n".join(format_execution(code, result, limit) for code, result in runs)
    return [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"{blocks}\n\n{next_prompt(query)}"},
    ]
