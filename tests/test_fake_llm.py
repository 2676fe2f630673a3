"""The scripted LLM over real HTTP, talked to by the real openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from fake_llm import FakeLLMServer, Scenario, load_scenario, shipped_scenarios
from rlm_cli.host_commands import fake_llm


def scenario(rules: list[dict[str, Any]], **extra: object) -> Scenario:
    return Scenario.model_validate({"name": "t", "rules": rules, **extra})


@pytest.fixture
def kinds_server() -> Iterator[FakeLLMServer]:
    rules = [
        {"name": "text", "match": {"user": "^hello (?P<who>\\w+)"},
         "reply": {"kind": "text", "text": "hi $who from $model"}},
        {"name": "code", "match": {"system": "coder", "iteration": 0},
         "reply": {"kind": "code", "text": "Plan.", "code": ["x = {'a': 1}", "print(x)"]}},
        {"name": "final", "match": {"system": "coder", "min_iteration": 1},
         "reply": {"kind": "final", "answer": "done $iteration"}},
        {"name": "final-var", "match": {"user": "^var"}, "reply": {"kind": "final", "var": "out"}},
        {"name": "count", "match": {"user": "^count '(?P<w>[^']+)'\\n"},
         "reply": {"kind": "count", "pattern": "\\b${w}\\b"}},
        {"name": "find", "match": {"user": "^find\\n"},
         "reply": {"kind": "find", "pattern": "key=(\\d+)", "group": 1}},
        {"name": "length", "match": {"user": "^len:"}, "reply": {"kind": "echo_length"}},
    ]  # fmt: skip
    with FakeLLMServer(scenario(rules)) as server:
        yield server


@pytest.fixture
def client(kinds_server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=kinds_server.base_url, api_key="k", max_retries=0) as c:
        yield c


def ask(client: openai.OpenAI, content: str, system: str | None = None, turns: int = 0) -> str:
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for _ in range(turns):
        messages += [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": content})
    reply = client.chat.completions.create(model="fake-root", messages=messages)  # type: ignore[arg-type]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    text = reply.choices[0].message.content
    assert text is not None
    return text


def test_text_reply_fills_templates(client: openai.OpenAI) -> None:
    assert ask(client, "hello world") == "hi world from fake-root"


def test_code_reply_is_a_repl_block(client: openai.OpenAI) -> None:
    assert ask(client, "go", system="you are a coder") == (
        "Plan.\n\n```repl\nx = {'a': 1}\nprint(x)\n```"
    )


def test_iteration_counts_assistant_messages(client: openai.OpenAI) -> None:
    assert ask(client, "go", system="coder", turns=2) == "FINAL(done 2)"


def test_final_var_reply(client: openai.OpenAI) -> None:
    assert ask(client, "var please") == "FINAL_VAR(out)"


def test_count_reply_counts_in_the_text_after_the_instruction(client: openai.OpenAI) -> None:
    # The word in the instruction line is not counted; 'apples' and 'pineapple' are not words.
    text = "count 'apple'\napple pie, apples, pineapple, Apple apple.\napple"
    assert ask(client, text) == "3"


def test_count_reply_escapes_the_word(client: openai.OpenAI) -> None:
    assert ask(client, "count 'a.c'\nabc a.c") == "1"


def test_find_reply_and_none(client: openai.OpenAI) -> None:
    assert ask(client, "find\nnoise key=4711 more key=1") == "4711"
    assert ask(client, "find\nnothing here") == "NONE"


def test_echo_length(client: openai.OpenAI) -> None:
    assert ask(client, "len:12345") == "5"


def test_no_matching_rule_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="no rule of scenario"):
        ask(client, "something else")


def test_streaming_with_final_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-root",
        messages=[{"role": "user", "content": "len:" + "x" * 100}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usages = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(pieces) == "100"
    assert len(usages) == 1
    assert usages[0].completion_tokens == 1


def test_long_streamed_reply_arrives_in_several_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-root",
        messages=[{"role": "system", "content": "coder"}, {"role": "user", "content": "go"}],
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 2
    assert "".join(pieces).endswith("print(x)\n```")


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-root", "fake-sub"]


def test_model_glob_selects_rules() -> None:
    rules = [
        {"name": "root", "match": {"model": "*-root"}, "reply": {"kind": "text", "text": "R"}},
        {"name": "other", "reply": {"kind": "text", "text": "S"}},
    ]
    with (
        FakeLLMServer(scenario(rules)) as server,
        openai.OpenAI(base_url=server.base_url, api_key="k") as c,
    ):
        for model, expected in (("fake-root", "R"), ("fake-sub", "S")):
            reply = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}]
            )
            assert reply.choices[0].message.content == expected
        assert server.stats()["rule_hits"] == {"root": 1, "other": 1}


def test_fail_first_n_then_success_with_retry_after() -> None:
    rules = [
        {"name": "r", "reply": {"kind": "text", "text": "ok"},
         "faults": {"fail_first_n": 2, "status": 429, "retry_after_s": 0.01}},
    ]  # fmt: skip
    with FakeLLMServer(scenario(rules)) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
            messages = [{"role": "user", "content": "x"}]
            for _ in range(2):
                with pytest.raises(openai.RateLimitError) as info:
                    c.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
                assert info.value.response.headers["retry-after-ms"] == "10"
            reply = c.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == "ok"
        assert server.stats()["failures_sent"] == 2


def test_global_fault_counts_every_request() -> None:
    rules = [{"name": "r", "reply": {"kind": "text", "text": "ok"}}]
    faults = {"fail_first_n": 1, "status": 503}
    with (
        FakeLLMServer(scenario(rules, faults=faults)) as server,
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c,
    ):
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}])
        assert reply.choices[0].message.content == "ok"


def test_wrong_api_key_is_rejected() -> None:
    rules = [{"name": "r", "reply": {"kind": "text", "text": "ok"}}]
    with FakeLLMServer(scenario(rules, api_key="right")) as server:
        with (
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as c,
            pytest.raises(openai.AuthenticationError),
        ):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        with openai.OpenAI(base_url=server.base_url, api_key="right") as c:
            messages = [{"role": "user", "content": "x"}]
            reply = c.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == "ok"


def test_every_shipped_scenario_loads() -> None:
    names = shipped_scenarios()
    for expected in ("count_words", "needle", "sequential", "depth2", "never_finishes",
                     "answer_dict", "flaky_count_words"):  # fmt: skip
        assert expected in names
    for name in names:
        assert load_scenario(name).name == name


def test_scenario_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    rule = {"name": "r", "reply": {"kind": "text", "text": "x"}}
    path.write_text(json.dumps({"name": "mine", "rules": [rule]}))
    assert load_scenario(path).name == "mine"
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_scenario("no_such_scenario")


def test_invalid_scenario_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        scenario([{"name": "r", "reply": {"kind": "poem"}}])
    with pytest.raises(ValueError, match="unique"):
        scenario([{"name": "r", "reply": {"kind": "text", "text": "a"}}] * 2)


def test_cli_lists_scenarios() -> None:
    result = CliRunner().invoke(fake_llm, ["--list"])
    assert result.exit_code == 0
    assert "count_words" in result.output.split()


def test_cli_rejects_unknown_scenario() -> None:
    result = CliRunner().invoke(fake_llm, ["--scenario", "nope"])
    assert result.exit_code == 2
    assert "no scenario file" in result.output


def test_rlm_fake_llm_command_serves_and_prints_its_url() -> None:
    import subprocess
    import sys

    rlm = Path(sys.executable).with_name("rlm")  # the console script of this venv
    command = [str(rlm), "fake-llm", "--scenario", "needle", "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        base_url = line.split()[-1]
        assert base_url.endswith("/v1")
        with openai.OpenAI(base_url=base_url, api_key="k") as c:
            reply = c.chat.completions.create(
                model="fake-sub",
                messages=[{"role": "user", "content": "Find the magic number in the text below.\n"
                                                      "x the magic number is 42 y"}],
            )  # fmt: skip
            assert reply.choices[0].message.content == "42"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
