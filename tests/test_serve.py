"""`rlm serve` as a real process, called by the real openai SDK (sync and async).

The service runs its own local stack (embedded Redis, broker, poller with sub-RLMs) with the
scripted LLM as root and sub model (`--scenario count_words`), environment "local".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from fake_llm import load_scenario
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.profiles import LLMSettings, Profile
from host_poller.service import RLMService, ServeSettings
from host_poller.service.models import ChatRequest
from host_poller.settings import HostSettings
from rlm_wire.errors import ApiError
from tests.support.sse import sse_events
from tests.test_rlm import make_text

API_KEY = "serve-test-key-1"
OTHER_KEY = "serve-test-key-2"
QUESTION = "How many times does the word 'whale' appear?"
MAX_CONTEXT = 200_000


@dataclass
class Served:
    url: str
    log: Path

    def client(self, key: str | None = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def post(
        self, body: Any, key: str | None = API_KEY, raw: bytes | None = None
    ) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx2.post(
            f"{self.url}/v1/chat/completions",
            content=content,
            headers={"Content-Type": "application/json", **headers},
            timeout=60,
        )


#: The line `rlm serve` announces its own address with (`  serve    http://127.0.0.1:N`).
SERVE_URL = re.compile(rb"^\s+serve\s+(http://127\.0\.0\.1:\d+)\s*$", re.MULTILINE)


def start_serve(tmp: Path, env: dict[str, str], args: list[str]) -> Iterator[Served]:
    """`rlm serve` on a port it picks (0: a port chosen here and freed could be taken before
    it binds, by another test's server) until the test is done; stops it with SIGTERM."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RLM_", "OPENAI_"))},
        "RLM_ENVIRONMENT": "local",
        "RLM_SERVE_ALLOW_LOCAL_ENVIRONMENT": "true",  # the test's own code and scenarios
        "RLM_TRAJECTORY_DIR": str(tmp / "trajectories"),
        "RLM_LOG_FORMAT": "json",
        "RLM_LOG_LEVEL": "INFO",
        **env,
    }
    rlm = str(Path(sys.executable).with_name("rlm"))
    log = tmp / "serve.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            [rlm, "serve", "--port", "0", *args], env=environ, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                assert child.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "rlm serve did not come up"
                announced = SERVE_URL.search(log.read_bytes())
                url = announced[1].decode() if announced else ""
                try:
                    if url and httpx2.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx2.HTTPError:
                    pass
                time.sleep(0.1)
            yield Served(url, log)
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    env = {
        "RLM_SERVE_API_KEYS": f"{API_KEY}, {OTHER_KEY}",
        "RLM_SERVE_MAX_CONTEXT_CHARS": str(MAX_CONTEXT),
        "RLM_SERVE_MAX_DEPTH": "2",
        "RLM_LEDGER_PATH": str(tmp / "ledger.sqlite"),
    }
    yield from start_serve(tmp, env, ["--scenario", "count_words"])


# --- answers ----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_string_context_in_extra_body(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"context": make_text("whale", 9)},
        temperature=0.2,  # goes to the root model's calls
    )
    assert completion.choices[0].message.content == "9"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "rlm"
    assert completion.object == "chat.completion"
    # The whole run: the root's turns and every chunk's sub-call, both models.
    usage = completion.usage
    assert usage is not None
    extra = completion.model_extra or {}
    run = extra["rlm"]
    assert run["stop_reason"] == "final"
    by_model = run["usage_by_model"]
    assert set(by_model) == {"fake-root", "fake-sub"}
    assert usage.prompt_tokens == sum(u["input_tokens"] for u in by_model.values())
    assert usage.completion_tokens == sum(u["output_tokens"] for u in by_model.values())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.model_extra or {})["llm_calls"] == sum(u["calls"] for u in by_model.values())
    assert by_model["fake-sub"]["calls"] >= 2  # one per chunk
    # The usage ledger has every call of the run: the root's (recorded by the service) and
    # the sub-calls (recorded by the poller).
    with UsageLedger(served.log.parent / "ledger.sqlite") as ledger:
        rows = ledger.totals(group_by=["model"], run_id=run["run_id"])
    recorded = {keys["model"]: totals.calls for keys, totals in rows}
    assert recorded == {m: u["calls"] for m, u in by_model.items()}


@pytest.mark.timeout(180)
def test_the_trajectory_viewer_is_served_at_view(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"context": make_text("whale", 4, seed=11)},
    )
    run_id = (completion.model_extra or {})["rlm"]["run_id"]
    page = httpx2.get(f"{served.url}/view/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    runs = httpx2.get(f"{served.url}/view/api/runs", timeout=30).json()
    assert run_id in json.dumps(runs)
    run = httpx2.get(f"{served.url}/view/api/runs/{run_id}", timeout=30)
    assert run.status_code == 200, run.text
    # The viewer keeps its own guard under the mount: a foreign Host is refused.
    rebound = httpx2.get(f"{served.url}/view/api/runs", headers={"Host": "evil.example"})
    assert rebound.status_code >= 400


@pytest.mark.timeout(180)
def test_the_context_from_the_messages_before_the_query(served: Served) -> None:
    text = make_text("whale", 5, seed=3)
    half = len(text) // 2
    cut = text.index("\n", half) + 1
    completion = served.client().chat.completions.create(
        model="rlm",
        messages=[
            {"role": "user", "content": text[:cut]},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": [{"type": "text", "text": text[cut:]}]},
            {"role": "user", "content": QUESTION},
        ],
    )
    assert completion.choices[0].message.content == "5"


@pytest.mark.timeout(180)
def test_a_list_context_with_the_async_client_and_a_named_profile(served: Served) -> None:
    async def ask() -> Any:
        async with served.async_client() as client:
            return await client.chat.completions.create(
                model="rlm/scripted-root",
                messages=[{"role": "user", "content": QUESTION}],
                extra_body={"context": [make_text("whale", 2, seed=1), make_text("whale", 4)]},
            )

    completion = asyncio.run(ask())
    assert completion.choices[0].message.content == "6"
    assert completion.model == "rlm/scripted-root"


@pytest.mark.timeout(180)
def test_streaming_in_standard_chunks_with_usage(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"context": make_text("whale", 11)},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "11"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


@pytest.mark.timeout(180)
def test_a_stream_carries_progress_as_comments_standard_clients_skip(served: Served) -> None:
    body = {
        "model": "rlm",
        "stream": True,
        "messages": [{"role": "user", "content": QUESTION}],
        "context": make_text("whale", 3),
    }
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    with httpx2.stream(
        "POST", f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    comments = [
        json.loads(line.removeprefix(": rlm ")) for line in lines if line.startswith(": rlm")
    ]
    assert {"iteration_start", "iteration"} <= {c["event"] for c in comments}
    assert lines[-1] == "data: [DONE]"


def test_models_lists_rlm_and_each_profile(served: Served) -> None:
    names = [m.id for m in served.client().models.list()]
    assert names == ["rlm", "rlm/scripted-root", "rlm/scripted-sub"]


def test_health_needs_no_key(served: Served) -> None:
    answer = httpx2.get(f"{served.url}/health", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ok",
        "runs_in_flight": 0,
        "concurrency": 4,
        "conversations_open": 0,
    }


# --- refusals: OpenAI-style error JSON --------------------------------------------------------


def _error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("key", [None, "wrong-key", f"{API_KEY}x"], ids=["none", "wrong", "longer"])
def test_without_a_right_key_it_is_401(served: Served, key: str | None) -> None:
    body = {"model": "rlm", "messages": [{"role": "user", "content": QUESTION}], "context": "x"}
    error = _error(served.post(body, key=key), 401)
    assert error["code"] == "unauthorized"
    assert error["type"] == "authentication_error"
    assert _error(httpx2.get(f"{served.url}/v1/models", timeout=10), 401)["code"] == "unauthorized"
    with pytest.raises(openai.AuthenticationError):
        served.client(key or "none").models.list()


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        ({"model": "rlm", "messages": []}, "invalid_body", "messages"),
        ({"model": "rlm", "messages": "hello"}, "invalid_body", "messages"),
        ({"messages": [{"role": "user", "content": "q"}]}, "invalid_body", "model"),
        ({"model": "rlm", "messages": [{"role": "system", "content": "c"}]}, "bad_request",
         "need a user message"),
        ({"model": "rlm", "messages": [{"role": "user", "content": QUESTION}]}, "bad_request",
         "no context"),
        ({"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": 3},
         "invalid_body", "context"),
        ({"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c",
          "max_depth": 3}, "bad_request", "max_depth=3 is over this service's limit of 2"),
        ({"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c",
          "budget": {"max_tokens": -1}}, "invalid_body", "budget.max_tokens"),
        ({"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c",
          "n": 2}, "invalid_body", "n"),
        ({"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c",
          "tools": [{"type": "function"}]}, "invalid_body", "does not call tools"),
        ({"model": "rlm", "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
          "context": "c"}, "invalid_body", "messages.0"),
    ],
)  # fmt: skip
def test_bad_input_is_400_with_a_code(
    served: Served, body: dict[str, Any], code: str, says: str
) -> None:
    error = _error(served.post(body), 400)
    assert error["code"] == code
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(served: Served) -> None:
    assert _error(served.post(None, raw=b'{"model": "rlm",'), 400)["code"] == "bad_request"
    assert _error(served.post(None, raw=b""), 400)["code"] == "bad_request"


@pytest.mark.parametrize("model", ["rlm/nope", "gpt-4o", "rlm/"])
def test_an_unknown_model_is_404(served: Served, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"context": "c"},
        )
    assert caught.value.code == "model_not_found"
    assert "rlm/scripted-root" in caught.value.message


def test_an_over_size_context_is_413(served: Served) -> None:
    body = {
        "model": "rlm",
        "messages": [{"role": "user", "content": QUESTION}],
        "context": "w" * (MAX_CONTEXT + 1),
    }
    error = _error(served.post(body), 413)
    assert error["code"] == "payload_too_large"
    assert "RLM_SERVE_MAX_CONTEXT_CHARS" in error["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        served.client().chat.completions.create(
            model="rlm",
            messages=[
                {"role": "system", "content": "w" * MAX_CONTEXT},
                {"role": "user", "content": QUESTION},
            ],
        )
    assert caught.value.status_code == 413


def test_unknown_routes_and_methods_answer_in_the_same_form(served: Served) -> None:
    assert _error(httpx2.get(f"{served.url}/v1/nothing", timeout=10), 404)["code"] == "not_found"
    answer = httpx2.get(f"{served.url}/v1/chat/completions", timeout=10)
    assert _error(answer, 405)["code"] == "method_not_allowed"


# --- bounds of the service itself (no process needed) -----------------------------------------


def _service(**settings: Any) -> RLMService:
    profile = Profile(name="p", base_url="http://127.0.0.1:9/v1", model="m")
    llm = LLMSettings(llm_profiles=(profile,))
    return RLMService(ServeSettings(**settings), HostSettings(), llm)


def test_sampling_settings_go_to_the_root_model() -> None:
    service = _service()
    chat = ChatRequest.model_validate(
        {"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c",
         "temperature": 0.3, "reasoning_effort": "low", "max_tokens": 5}
    )  # fmt: skip
    assert service.plan(chat).root_params == {"temperature": 0.3, "reasoning_effort": "low"}
    plain = chat.model_copy(update={"temperature": None, "reasoning_effort": None})
    assert service.plan(plain).root_params is None


def test_a_full_service_refuses_with_429_and_frees_its_slots() -> None:
    service = _service(concurrency=2)
    with service.slot(), service.slot():
        with pytest.raises(ApiError) as caught:
            service.acquire()
        assert caught.value.status == 429
        assert caught.value.headers["Retry-After"] == "1"
    assert service.in_flight == 0
    with service.slot():
        assert service.in_flight == 1


def test_without_keys_the_service_listens_only_on_loopback() -> None:
    ServeSettings(host="127.0.0.1").check("pyodide")
    with pytest.raises(ValueError, match="RLM_SERVE_API_KEYS"):
        ServeSettings(host="0.0.0.0").check("pyodide")
    ServeSettings(host="0.0.0.0", api_keys="k").check("pyodide")


def test_the_local_environment_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="RLM_SERVE_ALLOW_LOCAL_ENVIRONMENT=true"):
        ServeSettings().check("local")
    ServeSettings(allow_local_environment=True).check("local")


# --- a run that takes too long, while another request finds the service full ------------------


def _slow_serve(tmp_path: Path, run_timeout_s: float) -> Iterator[Served]:
    """One run at a time, a root that never finishes and answers slowly."""
    slow = load_scenario("never_finishes").model_dump(mode="json")
    slow["faults"] = {"delay_s": 0.5}
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(slow))
    env = {
        "RLM_SERVE_API_KEYS": API_KEY,
        "RLM_SERVE_CONCURRENCY": "1",
        "RLM_SERVE_RUN_TIMEOUT_S": str(run_timeout_s),
        "RLM_SERVE_HEARTBEAT_S": "0.2",
    }
    yield from start_serve(tmp_path, env, ["--scenario", str(path)])


@pytest.fixture
def slow_served(tmp_path: Path) -> Iterator[Served]:
    """Runs that end by their timeout (long enough for a busy machine to see the slot held)."""
    yield from _slow_serve(tmp_path, 6)


@pytest.fixture(scope="module")
def endless_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Runs that outlast any test: only their client going away ends them. One service for
    the tests that use it: each ends with its one run slot free again (they assert so)."""
    yield from _slow_serve(tmp_path_factory.mktemp("endless"), 600)


@pytest.mark.timeout(120)
def test_a_full_service_is_429_and_a_run_past_its_time_is_504(slow_served: Served) -> None:
    body = {"model": "rlm", "messages": [{"role": "user", "content": "q"}], "context": "c"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx2.stream(
        "POST",
        f"{slow_served.url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=headers,
        timeout=60,
    ) as streamed:
        lines = streamed.iter_lines()
        first = next(line for line in lines if line)
        assert (
            json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        )
        # The one run slot is taken until this stream ends.
        busy = slow_served.post(body)
        assert _error(busy, 429)["code"] == "too_many_requests"
        assert busy.headers["Retry-After"] == "1"
        rest = [line for line in lines if line]
    assert ": keep-alive" in rest or any(line.startswith(": rlm") for line in rest)
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"]) == ("run_timeout", "server_error")
    assert rest[-1] == "data: [DONE]"
    # Not streamed: the same timeout is a 504; and the slot is free again for it.
    assert _error(slow_served.post(body), 504)["code"] == "run_timeout"
    health = httpx2.get(f"{slow_served.url}/health", timeout=10).json()
    assert health["runs_in_flight"] == 0


# --- the native run API -----------------------------------------------------------------------


def _sse_events(response: httpx2.Response) -> list[tuple[str, dict[str, Any]]]:
    return sse_events(response.iter_lines())


@pytest.mark.timeout(180)
def test_a_run_started_followed_and_read_by_id(served: Served) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    started = httpx2.post(
        f"{served.url}/v1/runs",
        json={"context": make_text("whale", 6), "query": QUESTION},
        headers=auth,
        timeout=30,
    )
    assert started.status_code == 202, started.text
    run = started.json()
    assert run["status"] == "running" and run["id"].startswith("run-")
    url = f"{served.url}/v1/runs/{run['id']}"
    with httpx2.stream("GET", f"{url}/events", headers=auth, timeout=60) as response:
        assert response.status_code == 200
        events = _sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "run_start" and names[-2:] == ["run_end", "end"]
    assert {"iteration", "sub_call"} <= set(names)
    iteration = next(data for name, data in events if name == "iteration")
    assert "llm_query_batched" in iteration["code"][0]["code"]  # the whole trajectory
    end = events[-1][1]
    assert (end["status"], end["answer"]) == ("succeeded", "6")
    read = httpx2.get(url, headers=auth, timeout=10).json()
    assert read["answer"] == "6" and read["usage"]["total_tokens"] > 0
    assert read["rlm"]["stop_reason"] == "final"
    # Following a finished run replays it.
    with httpx2.stream("GET", f"{url}/events", headers=auth, timeout=60) as response:
        assert [name for name, _ in _sse_events(response)] == names
    # Another application's key does not find it.
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert _error(httpx2.get(url, headers=other, timeout=10), 404)["code"] == "not_found"
    assert _error(httpx2.post(f"{url}/cancel", headers=other, timeout=10), 404)
    assert _error(httpx2.get(url, timeout=10), 401)["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"query": QUESTION}, "context"),
        ({"context": "c"}, "query"),
        ({"context": "c", "query": "q", "messages": []}, "messages"),
        ({"context": "c", "query": "q", "max_iterations": 0}, "max_iterations"),
    ],
)
def test_a_bad_run_is_400(served: Served, body: dict[str, Any], says: str) -> None:
    answer = httpx2.post(
        f"{served.url}/v1/runs", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )  # fmt: skip
    error = _error(answer, 400)
    assert error["code"] == "invalid_body" and says in error["message"]


@pytest.mark.timeout(120)
def test_a_run_is_cancelled_by_id(endless_served: Served) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    started = httpx2.post(
        f"{endless_served.url}/v1/runs", json={"context": "c", "query": "q"}, headers=auth,
        timeout=30,
    )  # fmt: skip
    url = f"{endless_served.url}/v1/runs/{started.json()['id']}"
    # The run holds the service's one slot.
    busy = endless_served.post({"model": "rlm", "messages": [{"role": "user", "content": "q"}],
                             "context": "c"})  # fmt: skip
    assert _error(busy, 429)["code"] == "too_many_requests"
    cancelled = httpx2.post(f"{url}/cancel", headers=auth, timeout=30).json()
    assert cancelled["status"] == "cancelled"
    assert httpx2.get(f"{endless_served.url}/health", timeout=10).json()["runs_in_flight"] == 0
    with httpx2.stream("GET", f"{url}/events", headers=auth, timeout=30) as response:
        assert _sse_events(response)[-1] == ("end", cancelled)


@pytest.mark.timeout(120)
def test_a_client_that_goes_away_frees_its_run_slot(endless_served: Served) -> None:
    body = {"model": "rlm", "stream": True, "context": "c",
            "messages": [{"role": "user", "content": "q"}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    health = f"{endless_served.url}/health"
    logged_before = endless_served.log.stat().st_size  # the service is shared: this test's log
    with httpx2.stream(
        "POST", f"{endless_served.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as streamed:
        # The iterator is kept: a dropped one would close the response (the client gone).
        lines = streamed.iter_lines()
        next(line for line in lines if line)  # the run has its slot
        assert httpx2.get(health, timeout=10).json()["runs_in_flight"] == 1
    # The connection is closed: the service notices, cancels the run, frees the slot.
    deadline = time.monotonic() + 30
    while httpx2.get(health, timeout=10).json()["runs_in_flight"] != 0:
        assert time.monotonic() < deadline, "the run slot was never freed"
        time.sleep(0.1)
    log = endless_served.log.read_bytes()[logged_before:].decode(errors="replace")
    assert "streamed run cancelled (client gone)" in log
