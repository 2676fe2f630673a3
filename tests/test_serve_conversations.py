"""`rlm serve` conversations: several questions on one REPL, through the native API and
through the real openai SDK (`extra_body={"conversation": id}`), streamed or not.

The scripted LLM plays count_words: a first question counts the word over `context` into the
REPL variable `total`; any later question is answered `FINAL_VAR(total)`, which only a REPL
that kept the first question's variables can answer.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.test_rlm import make_text
from tests.test_serve import API_KEY, OTHER_KEY, QUESTION, Served, _slow_serve, start_serve

pytestmark = pytest.mark.timeout(180)

IDLE_S = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-conversations")
    env = {
        "RLM_SERVE_API_KEYS": f"{API_KEY}, {OTHER_KEY}",
        "RLM_SERVE_MAX_CONVERSATIONS": "3",
        "RLM_SERVE_MAX_TURNS": "3",
        "RLM_SERVE_CONVERSATION_IDLE_S": str(IDLE_S),
    }
    yield from start_serve(tmp, env, ["--scenario", "count_words"])


def _call(
    served: Served, method: str, path: str, body: Any = None, key: str = API_KEY
) -> httpx2.Response:
    return httpx2.request(
        method,
        f"{served.url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=90,
    )


def _open(served: Served, body: dict[str, Any] | None = None) -> str:
    response = _call(served, "POST", "/v1/conversations", body or {})
    assert response.status_code == 201, response.text
    conversation: dict[str, Any] = response.json()
    assert conversation["object"] == "rlm.conversation" and conversation["turns"] == []
    return str(conversation["id"])


def test_questions_on_one_repl_through_the_native_api(served: Served) -> None:
    conversation = _open(served, {"context": make_text("whale", 7)})
    path = f"/v1/conversations/{conversation}"
    first = _call(served, "POST", f"{path}/messages", {"query": QUESTION})
    assert first.status_code == 200, first.text
    assert (first.json()["answer"], first.json()["turn"]) == ("7", 1)
    # No context, no counting code: only the REPL's `total` from the first question answers.
    again = _call(served, "POST", f"{path}/messages", {"query": "And again?"})
    assert (again.json()["answer"], again.json()["turn"]) == ("7", 2), again.text
    record = _call(served, "GET", path).json()
    assert [t["query"] for t in record["turns"]] == [QUESTION, "And again?"]
    assert record["turns"][1]["rlm"]["run_id"] == record["run_id"]
    # Another key cannot see, ask or close it.
    for method, suffix, body in [("GET", "", None), ("POST", "/messages", {"query": "x"}),
                                 ("DELETE", "", None)]:  # fmt: skip
        response = _call(served, method, f"{path}{suffix}", body, key=OTHER_KEY)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert _call(served, "DELETE", path).status_code == 204
    assert _call(served, "GET", path).status_code == 404


def test_the_openai_sdk_talks_to_a_conversation_streamed_or_not(served: Served) -> None:
    conversation = _open(served)
    client = served.client()
    first = client.chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"conversation": conversation, "context": make_text("whale", 5)},
    )
    assert first.choices[0].message.content == "5"
    stream = client.chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": "Once more?"}],
        stream=True,
        extra_body={"conversation": conversation},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "5"
    assert len(_call(served, "GET", f"/v1/conversations/{conversation}").json()["turns"]) == 2
    _call(served, "DELETE", f"/v1/conversations/{conversation}")


def test_bounds_first_context_turns_and_open_conversations(served: Served) -> None:
    conversation = _open(served)
    path = f"/v1/conversations/{conversation}/messages"
    no_context = _call(served, "POST", path, {"query": QUESTION})
    assert no_context.status_code == 400 and "needs a context" in no_context.text
    for _ in range(3):  # RLM_SERVE_MAX_TURNS=3
        ok = _call(served, "POST", path, {"query": QUESTION, "context": make_text("whale", 2)})
        assert ok.status_code == 200, ok.text
    full = _call(served, "POST", path, {"query": QUESTION})
    assert full.status_code == 409 and full.json()["error"]["code"] == "conversation_full"
    unknown = _call(served, "POST", "/v1/conversations/conv_nope/messages", {"query": "x"})
    assert unknown.status_code == 404
    bad = _call(served, "POST", "/v1/conversations", {"context": 3})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_body"
    others = [_open(served) for _ in range(2)]  # 3 open now: RLM_SERVE_MAX_CONVERSATIONS
    too_many = _call(served, "POST", "/v1/conversations", {})
    assert too_many.status_code == 429 and too_many.headers["retry-after"]
    for each in [conversation, *others]:
        assert _call(served, "DELETE", f"/v1/conversations/{each}").status_code == 204


def test_an_idle_conversation_is_closed(served: Served) -> None:
    conversation = _open(served, {"context": "whale"})
    path = f"/v1/conversations/{conversation}"
    assert _call(served, "POST", f"{path}/messages", {"query": QUESTION}).status_code == 200
    deadline = time.monotonic() + 6 * IDLE_S
    while _call(served, "GET", path).status_code == 200:
        assert time.monotonic() < deadline, "the idle conversation was not closed"
        time.sleep(0.5)
    assert _call(served, "POST", f"{path}/messages", {"query": "x"}).status_code == 404


def test_health_counts_open_conversations(served: Served) -> None:
    conversation = _open(served)
    assert httpx2.get(f"{served.url}/health").json()["conversations_open"] >= 1
    _call(served, "DELETE", f"/v1/conversations/{conversation}")
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(
            model="rlm",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": conversation},
        )


@pytest.fixture
def endless(tmp_path: Path) -> Iterator[Served]:
    """A root that never finishes: a question runs until something ends it."""
    yield from _slow_serve(tmp_path, 600)


def test_closing_a_conversation_ends_the_question_it_runs(endless: Served) -> None:
    conversation = _open(endless, {"context": "c"})
    path = f"/v1/conversations/{conversation}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        asking = pool.submit(_call, endless, "POST", f"{path}/messages", {"query": "q"})
        deadline = time.monotonic() + 60
        while httpx2.get(f"{endless.url}/health").json()["runs_in_flight"] != 1:
            assert time.monotonic() < deadline and not asking.done(), "the question never ran"
            time.sleep(0.1)
        assert _call(endless, "DELETE", path).status_code == 204
        answer = asking.result(timeout=60)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "conversation_closed"
    health = httpx2.get(f"{endless.url}/health").json()
    assert (health["runs_in_flight"], health["conversations_open"]) == (0, 0)
