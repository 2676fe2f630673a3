"""Named LLM profiles and the settings that list them.

A profile names an OpenAI-compatible endpoint and a model. The key is never stored in the
profile: it names the environment variable holding it, read when the client is built.

Profiles come from a JSON or TOML file (`RLM_LLM_PROFILES_FILE`) and/or the JSON in
`RLM_LLM_PROFILES`; either holds a list of profiles, a mapping name -> profile, or either of
those under a top-level `profiles` key. See docs/llm-profiles.md.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from host_poller.llm.errors import LLMConfigError


class Profile(BaseModel):
    """One model behind one OpenAI-compatible endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Name the settings refer to (root_profile, sub_profile).")
    base_url: str = Field(description="Endpoint base URL, e.g. https://api.openai.com/v1.")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key; None: no key "
        "(local servers such as Ollama or vLLM).",
    )
    model: str = Field(description="Model name sent in each request.")
    input_price_per_mtok: float | None = Field(
        default=None,
        ge=0,
        description="USD per million input tokens; None: look the model up in genai-prices.",
    )
    output_price_per_mtok: float | None = Field(
        default=None,
        ge=0,
        description="USD per million output tokens; None: look the model up in genai-prices.",
    )
    timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one HTTP attempt.")
    max_retries: int = Field(
        default=4, ge=0, description="Retries by the openai SDK on 429, 5xx, timeouts."
    )
    concurrency: int = Field(default=16, ge=1, description="Calls in flight at once per client.")

    @property
    def has_prices(self) -> bool:
        """True when the profile sets a price (the other one then counts as 0)."""
        return self.input_price_per_mtok is not None or self.output_price_per_mtok is not None

    def api_key(self, environ: Mapping[str, str] | None = None) -> SecretStr | None:
        """Read the key from `api_key_env` (in `environ`, default os.environ)."""
        if self.api_key_env is None:
            return None
        env = os.environ if environ is None else environ
        value = env.get(self.api_key_env)
        if not value:
            raise LLMConfigError(
                f"LLM profile {self.name!r} reads its API key from {self.api_key_env} "
                f"(its api_key_env), but {self.api_key_env} is not set",
                model=self.model,
            )
        return SecretStr(value)


def _profiles_from_document(data: Any, source: str) -> list[dict[str, Any]]:
    """Normalise a profiles document (list, mapping, or either under `profiles`)."""
    if isinstance(data, Mapping) and set(data) == {"profiles"}:
        data = data["profiles"]
    if isinstance(data, list):
        return [dict(item) for item in data]
    if isinstance(data, Mapping):
        out = []
        for name, spec in data.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"{source}: profile {name!r} is not an object")
            out.append({"name": name, **spec})
        return out
    raise ValueError(f"{source}: expected a list or a mapping of profiles")


def load_profiles_file(path: Path) -> list[dict[str, Any]]:
    """Read a JSON (`.json`) or TOML (any other suffix) profiles file."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return _profiles_from_document(data, str(path))


class LLMSettings(BaseSettings):
    """Which models the host side talks to; built once at start from RLM_* variables."""

    model_config = SettingsConfigDict(env_prefix="RLM_", frozen=True, extra="ignore")

    llm_profiles_file: Path | None = Field(
        default=None, description="JSON or TOML file of profiles (RLM_LLM_PROFILES_FILE)."
    )
    llm_profiles: tuple[Profile, ...] = Field(
        default=(),
        description="Profiles as JSON (RLM_LLM_PROFILES); the file's profiles come first.",
    )
    root_profile: str | None = Field(
        default=None, description="Profile of the root model; default: the first profile."
    )
    sub_profile: str | None = Field(
        default=None, description="Profile of sub-calls (llm_query); default: the root profile."
    )

    @field_validator("llm_profiles", mode="before")
    @classmethod
    def _normalise_profiles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, Profile) for v in value):
            return value
        return _profiles_from_document(value, "RLM_LLM_PROFILES")

    @model_validator(mode="after")
    def _merge_file_and_check(self) -> LLMSettings:
        profiles = list(self.llm_profiles)
        if self.llm_profiles_file is not None:
            from_file = [Profile(**p) for p in load_profiles_file(self.llm_profiles_file)]
            profiles = from_file + profiles
        names = [p.name for p in profiles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate LLM profile names: {duplicates}")
        for field in ("root_profile", "sub_profile"):
            wanted = getattr(self, field)
            if wanted is not None and wanted not in names:
                raise ValueError(f"{field}={wanted!r} is not a defined profile ({names})")
        # Frozen model: the merged tuple replaces the env-only one once, here.
        object.__setattr__(self, "llm_profiles", tuple(profiles))
        return self

    @property
    def profiles(self) -> dict[str, Profile]:
        """All profiles by name, file first then RLM_LLM_PROFILES."""
        return {p.name: p for p in self.llm_profiles}

    @property
    def is_configured(self) -> bool:
        """True when at least one real provider profile is defined."""
        return bool(self.llm_profiles)

    def check_api_keys(self, environ: Mapping[str, str] | None = None) -> None:
        """Raise `LLMConfigError` for the first profile whose `api_key_env` is unset (in
        `environ`, default os.environ): a start-up check, before any call needs the key."""
        for profile in self.llm_profiles:
            profile.api_key(environ)

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise LLMConfigError(f"no LLM profile named {name!r}", model="?") from None

    def root(self) -> Profile:
        """The root model's profile."""
        if self.root_profile is not None:
            return self.profile(self.root_profile)
        if not self.llm_profiles:
            raise LLMConfigError("no LLM profile is configured", model="?")
        return self.llm_profiles[0]

    def sub(self) -> Profile:
        """The sub-call model's profile (the root's when `sub_profile` is unset)."""
        if self.sub_profile is not None:
            return self.profile(self.sub_profile)
        return self.root()
