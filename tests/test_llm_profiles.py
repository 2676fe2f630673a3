"""Profiles, LLMSettings from the environment and files, and pricing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from host_poller.llm import LLMConfigError, LLMSettings, Profile, build_client, cost_usd
from rlm_cli.scripted import scripted_profiles

ROOT = {"base_url": "https://api.openai.com/v1", "model": "gpt-4o", "api_key_env": "OPENAI_API_KEY"}
SUB = {"base_url": "http://localhost:11434/v1", "model": "llama3", "input_price_per_mtok": 0}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RLM_LLM_PROFILES", "RLM_LLM_PROFILES_FILE", "RLM_ROOT_PROFILE",
                 "RLM_SUB_PROFILE", "RLM_MODEL", "RLM_SUB_MODEL", "OPENAI_BASE_URL",
                 "OPENAI_API_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_nothing_configured() -> None:
    settings = LLMSettings()
    assert not settings.is_configured
    with pytest.raises(LLMConfigError, match="no LLM profile"):
        settings.root()


def test_profiles_from_env_json_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_LLM_PROFILES", json.dumps({"big": ROOT, "small": SUB}))
    monkeypatch.setenv("RLM_SUB_PROFILE", "small")
    settings = LLMSettings()
    assert settings.is_configured
    assert settings.root().name == "big"
    assert settings.sub().model == "llama3"
    assert settings.root().timeout_s == 120
    assert settings.root().concurrency == 16


def test_profiles_from_toml_file_then_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text(
        '[profiles.big]\nbase_url = "https://api.openai.com/v1"\nmodel = "gpt-4o"\n'
        "timeout_s = 30\nmax_retries = 2\n"
    )
    monkeypatch.setenv("RLM_LLM_PROFILES_FILE", str(path))
    monkeypatch.setenv("RLM_LLM_PROFILES", json.dumps([{"name": "small", **SUB}]))
    monkeypatch.setenv("RLM_ROOT_PROFILE", "small")
    settings = LLMSettings()
    assert list(settings.profiles) == ["big", "small"]
    assert settings.root().name == "small"
    assert settings.sub().name == "small"
    assert settings.profile("big").timeout_s == 30


def test_profiles_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "llm.json"
    path.write_text(json.dumps({"profiles": [{"name": "big", **ROOT}]}))
    assert LLMSettings(llm_profiles_file=path).root().model == "gpt-4o"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RLM_LLM_PROFILES": json.dumps({"a": ROOT}), "RLM_ROOT_PROFILE": "b"}, "not a defined"),
        ({"RLM_LLM_PROFILES": json.dumps([{"name": "a", **ROOT}] * 2)}, "duplicate"),
        ({"RLM_LLM_PROFILES": json.dumps({"a": {**ROOT, "api_key": "x"}})}, "api_key"),
        ({"RLM_LLM_PROFILES": json.dumps({"a": {**ROOT, "concurrency": 0}})}, "concurrency"),
    ],
)
def test_bad_settings_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        LLMSettings()


def test_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    profile = Profile(name="p", base_url="http://x/v1", model="m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(LLMConfigError, match="NO_SUCH_KEY_VAR is not set"):
        build_client(profile)


def test_key_is_read_when_the_client_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-abc")
    profile = Profile(name="p", base_url="http://x/v1", model="m", api_key_env="MY_KEY")
    key = profile.api_key()
    assert key is not None
    assert key.get_secret_value() == "sk-abc"
    assert "sk-abc" not in repr(key)
    assert "sk-abc" not in repr(profile)


def test_cost_from_profile_prices() -> None:
    profile = Profile(name="p", base_url="http://x/v1", model="m",
                      input_price_per_mtok=3.0, output_price_per_mtok=15.0)  # fmt: skip
    assert cost_usd("m", 1_000_000, 100_000, profile) == pytest.approx(4.5)
    free = Profile(name="p", base_url="http://x/v1", model="gpt-4o", input_price_per_mtok=0)
    assert cost_usd("gpt-4o", 1000, 1000, free) == 0.0


def test_cost_from_genai_prices_and_unknown_models() -> None:
    # gpt-4o-mini lists at 0.15 / 0.60 USD per million tokens in genai-prices' table.
    profile = Profile(name="p", base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, profile) == pytest.approx(0.75)
    local = Profile(name="p", base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini")
    assert cost_usd("gpt-4o-mini", 1_000_000, 0, local) == pytest.approx(0.15)
    assert cost_usd("surely-not-a-model-xyz", 1000, 1000) == 0.0
    assert cost_usd("surely-not-a-model-xyz", 1000, 1000) == 0.0  # cached miss


def test_a_gateway_style_name_is_priced_as_its_providers_model() -> None:
    """OpenRouter / LiteLLM names (`openai/gpt-4o-mini`) used to count 0 USD: a cost budget
    over them could never trip."""
    gateway = Profile(name="p", base_url="http://127.0.0.1:1/v1", model="openai/gpt-4o-mini")
    assert cost_usd("openai/gpt-4o-mini", 1_000_000, 1_000_000, gateway) == pytest.approx(0.75)
    assert cost_usd("anthropic/claude-3-5-sonnet", 1_000_000, 0) > 0
    assert cost_usd("someone/surely-not-a-model-xyz", 1000, 1000) == 0.0


def test_scripted_profiles_are_free() -> None:
    root, sub = scripted_profiles("http://127.0.0.1:9/v1")
    assert (root.model, sub.model) == ("fake-root", "fake-sub")
    assert cost_usd(root.model, 10**6, 10**6, root) == 0.0


# --- the openai SDK's standard variables ------------------------------------------------------


def test_openai_api_key_alone_means_openai_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-standard")
    monkeypatch.setenv("RLM_MODEL", "gpt-5-mini")
    settings = LLMSettings()
    assert settings.is_configured and settings.from_standard_variables
    root = settings.root()
    assert root.base_url == "https://api.openai.com/v1"
    assert root.api_key_env == "OPENAI_API_KEY"  # the key itself stays in the environment
    assert root.model == "gpt-5-mini"
    assert settings.sub() == root
    settings.check_api_keys()
    assert "sk-standard" not in settings.describe()
    assert "sk-standard" not in repr(settings)


def test_openai_base_url_alone_is_a_keyless_server_with_a_sub_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")
    settings = LLMSettings(model="llama3.1:70b", sub_model="llama3.1:8b")
    root, sub = settings.root(), settings.sub()
    assert (root.base_url, root.api_key_env, root.model) == (
        "http://localhost:11434/v1",
        None,
        "llama3.1:70b",
    )
    assert (sub.name, sub.model, sub.base_url) == ("openai-sub", "llama3.1:8b", root.base_url)
    assert build_client(root).model == "llama3.1:70b"


def test_profiles_win_over_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("RLM_LLM_PROFILES", json.dumps({"big": ROOT}))
    settings = LLMSettings()
    assert not settings.from_standard_variables
    assert settings.root().model == "gpt-4o"


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"OPENAI_BASE_URL": "http://h/v1"}, "OPENAI_BASE_URL is set, so that provider answers"),
        ({"OPENAI_BASE_URL": "http://h/v1", "OPENAI_API_KEY": "k"}, "are set"),
        ({"RLM_SUB_MODEL": "m"}, "no provider is configured"),
        ({"RLM_LLM_PROFILES": json.dumps({"big": ROOT}), "RLM_MODEL": "m"}, "RLM_ROOT_PROFILE"),
        ({"OPENAI_API_KEY": "k", "RLM_MODEL": "m", "RLM_ROOT_PROFILE": "x"}, "RLM_MODEL /"),
    ],
)
def test_a_standard_setting_that_cannot_be_honoured_is_an_error(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], says: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=says) as caught:
        LLMSettings()
    assert "k'" not in str(caught.value)  # the input (with OPENAI_API_KEY) is not shown


def test_an_error_never_shows_the_standard_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-in-the-environment")
    with pytest.raises(ValidationError) as caught:
        LLMSettings()
    assert "sk-secret" not in str(caught.value)


def test_a_cost_budget_needs_a_known_price() -> None:
    from host_poller.llm.profiles import check_cost_budget

    known = Profile(name="gpt", base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    gateway = Profile(name="or", base_url="https://openrouter.ai/api/v1", model="openai/gpt-4o")
    free = Profile(name="local", base_url="http://localhost:11434/v1", model="llama3",
                   input_price_per_mtok=0, output_price_per_mtok=0)  # fmt: skip
    check_cost_budget([known, gateway, free])
    unknown = Profile(name="local", base_url="http://localhost:11434/v1", model="llama3")
    with pytest.raises(LLMConfigError, match="no price is known for model 'llama3'"):
        check_cost_budget([known, unknown])


def test_the_poller_routes_by_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlm poller` builds its router from LLMSettings: sub-calls go to RLM_SUB_MODEL."""
    from host_poller.poller.router import ModelRouter

    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("RLM_MODEL", "big")
    monkeypatch.setenv("RLM_SUB_MODEL", "small")
    router = ModelRouter.from_settings(LLMSettings(), build_client)
    assert router.profile_name(None) == "openai-sub"
    assert router.profile_name("big") == "openai"
    assert router.client(None).model == "small"


# --- sampling settings per profile ------------------------------------------------------------


def test_a_profiles_params_go_with_every_call_and_a_calls_win() -> None:
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from rlm_wire.serving import ThreadedServer, uvicorn_config

    bodies: list[dict[str, object]] = []

    async def complete(request: Request) -> JSONResponse:
        bodies.append(await request.json())
        return JSONResponse({
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    app = Starlette(routes=[Route("/v1/chat/completions", complete, methods=["POST"])])
    profile = Profile(
        name="p", base_url="", model="m", params={"temperature": 0.2, "reasoning_effort": "low"}
    )

    async def two_calls(base_url: str) -> None:
        client = build_client(profile.model_copy(update={"base_url": base_url}))
        try:
            await client.complete([{"role": "user", "content": "hi"}])
            await client.complete([{"role": "user", "content": "hi"}], params={"temperature": 1})
        finally:
            await client.aclose()

    with ThreadedServer(uvicorn_config(app, "127.0.0.1", 0), name="capture") as server:
        asyncio.run(two_calls(f"{server.url}/v1"))
    assert [(b["temperature"], b["reasoning_effort"]) for b in bodies] == [(0.2, "low"), (1, "low")]


def test_a_profile_may_not_set_what_the_client_owns() -> None:
    with pytest.raises(ValidationError, match="params may not set \\['model'\\]"):
        Profile(name="p", base_url="http://h/v1", model="m", params={"model": "other"})
