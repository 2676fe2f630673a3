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
                 "RLM_SUB_PROFILE"):  # fmt: skip
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


def test_scripted_profiles_are_free() -> None:
    root, sub = scripted_profiles("http://127.0.0.1:9/v1")
    assert (root.model, sub.model) == ("fake-root", "fake-sub")
    assert cost_usd(root.model, 10**6, 10**6, root) == 0.0
