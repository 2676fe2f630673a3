"""Named LLM profiles and the settings that list them.

A profile names an OpenAI-compatible endpoint and a model. The key is never stored in the
profile: it names the environment variable holding it, read when the client is built.

Profiles come from a JSON or TOML file (`RLM_LLM_PROFILES_FILE`) and/or the JSON in
`RLM_LLM_PROFILES`; either holds a list of profiles, a mapping name -> profile, or either of
those under a top-level `profiles` key. With neither, the standard variables of the openai
SDK (`OPENAI_BASE_URL`, `OPENAI_API_KEY`) with a model name (`RLM_MODEL`, `RLM_SUB_MODEL`)
make the root and sub profiles. See docs/llm-profiles.md.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from host_poller.llm.errors import LLMConfigError

#: Request fields the client owns; neither a profile's nor a call's `params` may set them.
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "n"})
#: Where the openai SDK sends requests when OPENAI_BASE_URL is unset.
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Names of the profiles made from the standard variables.
STANDARD_ROOT_PROFILE = "openai"
STANDARD_SUB_PROFILE = "openai-sub"
#: What to set when no LLM is configured at all (the CLI's one-line errors end with it).
HOW_TO_CONFIGURE = (
    "set OPENAI_BASE_URL and/or OPENAI_API_KEY with RLM_MODEL (any OpenAI-compatible "
    "provider), or LLM profiles (RLM_LLM_PROFILES / RLM_LLM_PROFILES_FILE)"
)


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
    http_transport: Literal["auto", "httpx", "link"] = Field(
        default="auto",
        description="What carries the openai SDK's requests: `httpx` its own httpx2 client "
        "(proxy variables, every answer header); `link` the project's lean keep-alive "
        "HTTP/1.1 transport (about half the CPU per call; no proxies, of the answer headers "
        "only Retry-After, connects bounded by timeout_s); `auto` link for a plain-http "
        "endpoint no proxy variable covers (a local server), else httpx.",
    )
    params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Extra request fields sent with every call of this profile: sampling "
        "settings such as temperature, top_p, max_completion_tokens, reasoning_effort.",
    )

    @field_validator("params")
    @classmethod
    def _not_reserved(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        reserved = sorted(RESERVED_PARAMS.intersection(value))
        if reserved:
            raise ValueError(f"params may not set {reserved}: the client sets them")
        return value

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

    # Errors never show the input: it holds OPENAI_API_KEY.
    model_config = SettingsConfigDict(
        env_prefix="RLM_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

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
    model: str | None = Field(
        default=None,
        description="Root model name at the provider of OPENAI_BASE_URL / OPENAI_API_KEY, used "
        "when no profile is configured (`--model`).",
    )
    sub_model: str | None = Field(
        default=None,
        description="Sub-call model name at that provider; default: RLM_MODEL (`--sub-model`).",
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias="OPENAI_BASE_URL",
        description="The openai SDK's standard variable: the provider's endpoint when no "
        "profile is configured (default with OPENAI_API_KEY alone: https://api.openai.com/v1).",
    )
    _standard: bool = PrivateAttr(default=False)
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="OPENAI_API_KEY",
        description="The openai SDK's standard variable: the provider's key when no profile is "
        "configured (read from the environment when the client is built; never logged).",
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
        standard = bool(self.openai_base_url or self.openai_api_key)
        if profiles:
            for field in ("model", "sub_model"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"RLM_{field.upper()} names a model at OPENAI_BASE_URL's provider, but "
                        "LLM profiles are configured: choose among them with RLM_ROOT_PROFILE / "
                        "RLM_SUB_PROFILE instead"
                    )
        elif standard:
            profiles = self._standard_profiles()
            self._standard = True
        elif self.model is not None or self.sub_model is not None:
            raise ValueError(
                "RLM_MODEL / RLM_SUB_MODEL name a model but no provider is configured: set "
                "OPENAI_BASE_URL and/or OPENAI_API_KEY"
            )
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

    def _standard_profiles(self) -> list[Profile]:
        """Root (and sub, when it is another model) from OPENAI_BASE_URL / OPENAI_API_KEY."""
        if self.model is None:
            given = " and ".join(
                name
                for name, value in (
                    ("OPENAI_BASE_URL", self.openai_base_url),
                    ("OPENAI_API_KEY", self.openai_api_key),
                )
                if value
            )
            verb = "are" if " and " in given else "is"
            raise ValueError(
                f"{given} {verb} set, so that provider answers, but no model is named: set "
                "RLM_MODEL (or --model), e.g. RLM_MODEL=gpt-5-mini"
            )
        if self.root_profile is not None or self.sub_profile is not None:
            raise ValueError(
                "RLM_ROOT_PROFILE / RLM_SUB_PROFILE choose among LLM profiles, but none is "
                "configured: with OPENAI_BASE_URL / OPENAI_API_KEY use RLM_MODEL / RLM_SUB_MODEL"
            )

        def profile(name: str, model: str) -> Profile:
            return Profile(
                name=name,
                base_url=self.openai_base_url or OPENAI_DEFAULT_BASE_URL,
                # The key stays in the environment: the client reads it when it is built.
                api_key_env="OPENAI_API_KEY" if self.openai_api_key else None,
                model=model,
            )

        root = profile(STANDARD_ROOT_PROFILE, self.model)
        if self.sub_model is None or self.sub_model == self.model:
            return [root]
        object.__setattr__(self, "sub_profile", STANDARD_SUB_PROFILE)
        return [root, profile(STANDARD_SUB_PROFILE, self.sub_model)]

    @property
    def from_standard_variables(self) -> bool:
        """True when the profiles were made from OPENAI_BASE_URL / OPENAI_API_KEY."""
        return self._standard

    def describe(self) -> str:
        """One line naming the root and sub model and where they come from; never a key."""
        root, sub = self.root(), self.sub()
        where = "OPENAI_BASE_URL/OPENAI_API_KEY" if self.from_standard_variables else "LLM profiles"
        models = root.model if sub.model == root.model else f"{root.model}, sub {sub.model}"
        return f"LLM {models} at {root.base_url} ({where})"

    @classmethod
    def load(cls) -> LLMSettings:
        """From the environment; a bad setting is an `LLMConfigError` (its first message)."""
        try:
            return cls()
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise LLMConfigError(message, model="?") from exc

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


def check_cost_budget(profiles: Iterable[Profile]) -> None:
    """Raise `LLMConfigError` for the first profile whose calls would count 0 USD for want of
    a price: a cost budget could never stop it. A price set to 0 (a free local model) is
    known, and allowed."""
    from host_poller.llm.pricing import cost_usd  # the price table loads on first use only

    for profile in profiles:
        if profile.has_prices:
            continue
        if cost_usd(profile.model, 1_000_000, 1_000_000, profile) == 0:
            raise LLMConfigError(
                f"a cost budget cannot be kept: no price is known for model {profile.model!r} "
                f"(LLM profile {profile.name!r}), so its calls would count as free; set the "
                "profile's input_price_per_mtok and output_price_per_mtok (USD per million "
                "tokens), or budget tokens instead",
                model=profile.model,
            )
