"""The openai SDK driven without its per-call rebuilding (`host_poller.llm.sdk`): the same
options and URLs as the SDK's own `post`, and proof that the SDK still calls the parts
kept (an SDK that renamed them would silently lose the gain, so these tests fail)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from openai import NotGiven
from openai._models import FinalRequestOptions

from fake_llm import FakeLLMServer, Scenario
from host_poller.llm import Profile, build_client
from host_poller.llm.sdk import ChatCall, LeanAsyncOpenAI
from host_poller.llm.transport import LinkClient

OPTIONS: list[dict[str, Any]] = [
    {},
    {"headers": {"traceparent": "t"}, "timeout": 3.0},
    {"params": {"q": "1"}, "extra_json": {"provider_field": 1}},
]


def comparable(options: FinalRequestOptions) -> dict[str, Any]:
    """The fields, with the SDK's `NotGiven` markers (equal to no other) as one value."""
    return {
        name: "not given" if isinstance(value, NotGiven) else value
        for name, value in options.model_dump().items()
    }


@pytest.mark.parametrize("options", OPTIONS)
def test_the_options_are_those_post_builds(options: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    call = ChatCall("/chat/completions")
    made = call.options(body, options)
    # What `AsyncAPIClient.post("/chat/completions", body=body, options=options)` builds.
    posted = FinalRequestOptions.construct(
        method="post", url="/chat/completions", json_data=body, content=None, files=None,
        **options,
    )  # fmt: skip
    assert comparable(made) == comparable(posted)
    assert made.model_fields_set == posted.model_fields_set
    assert isinstance(call.options(body, {}).headers, NotGiven)  # nothing kept between calls


@pytest.mark.anyio
async def test_the_url_of_a_path_is_the_sdks_and_follows_the_base_url() -> None:
    client = LeanAsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="k")
    try:
        first = client._prepare_url("/chat/completions")
        assert first == httpx2.URL("http://127.0.0.1:9/v1/chat/completions")
        assert client._prepare_url("/chat/completions") is first  # built once
        client.base_url = "http://127.0.0.1:9/v2"
        assert client._prepare_url("/chat/completions") == httpx2.URL(
            "http://127.0.0.1:9/v2/chat/completions"
        )
    finally:
        await client.close()


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    scenario = {"name": "t", "rules": [{"name": "r", "reply": {"kind": "text", "text": "ok"}}]}
    with FakeLLMServer(Scenario.model_validate(scenario)) as server:
        yield server


@pytest.mark.anyio
async def test_a_call_uses_the_parts_built_once(fake: FakeLLMServer) -> None:
    profile = Profile.model_validate(
        {"name": "p", "base_url": fake.base_url, "model": "fake-sub", "http_transport": "link",
         "input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0}
    )  # fmt: skip
    client = build_client(profile)
    try:
        for _ in range(2):
            done = await client.complete([{"role": "user", "content": "hi"}])
            assert done.text == "ok"
        sdk = client._openai
        assert isinstance(sdk, LeanAsyncOpenAI)
        assert "/chat/completions" in sdk.urls  # the SDK asked for its URL
        http = sdk._client
        assert isinstance(http, LinkClient)
        assert f"{fake.base_url}/chat/completions" in http.urls  # and built with it
    finally:
        await client.aclose()
    assert fake.stats()["requests"] == 2
