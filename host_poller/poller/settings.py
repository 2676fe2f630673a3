"""The poller's settings: one frozen object, built once at start from `RLM_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from host_poller.poller.errors import PollerConfigError
from rlm_wire.serving import BROKER_PORT


class PollerSettings(BaseSettings):
    """Every knob of `rlm poller`; each field's environment variable is `RLM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_", frozen=True, extra="ignore")

    broker_url: str = Field(
        f"http://127.0.0.1:{BROKER_PORT}",
        description="Base URL of the broker (RLM_BROKER_URL); for the poller, a comma-separated "
        "list of the replicas of one broker (sharing one Redis): it drains from the first that "
        "answers and fails over to the next.",
    )
    tenant_token: SecretStr | None = Field(
        None, description="Tenant token: the poller answers this tenant's requests only."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Admin token: the poller answers every tenant (used when no tenant token).",
    )
    ledger_path: Path | None = Field(
        None, description="SQLite usage ledger of every answered call (RLM_LEDGER_PATH)."
    )
    ledger_detail_days: float = Field(
        30.0,
        ge=1,
        le=36_500,
        description="The usage ledger keeps each call this many days, then folds it into one "
        "row per UTC day and per tenant, session, run, model and depth: every total stays "
        "exact, and the file grows with runs, not calls (docs/llm-profiles.md).",
    )
    poller_concurrency: int = Field(
        32, ge=1, le=10_000, description="Requests answered at once by this poller, all tenants."
    )
    poller_tenant_concurrency: int = Field(
        16, ge=1, le=10_000, description="Requests of one tenant answered at once by this poller."
    )
    poller_http_transport: Literal["link", "httpx"] = Field(
        "link",
        description="How the poller talks to the broker: `link`, a lean HTTP/1.1 keep-alive "
        "transport (2-5x less poller CPU per round trip than httpx2; ignores proxy variables), "
        "or `httpx`, httpx2 (honours HTTP(S)_PROXY / NO_PROXY: use it when the broker is "
        "reached through a proxy).",
    )
    poller_wait_s: float = Field(
        20.0, ge=0, le=120, description="Long-poll wait of each GET /pending."
    )
    poller_http_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of each broker call (long-polls get their wait on top)."
    )
    poller_respond_batch: int = Field(
        64, ge=1, le=1024, description="Most answers posted in one POST /respond."
    )
    poller_respond_window_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long finished answers wait for company before one POST /respond. "
        "0: post at once; answers that finish while a POST is in flight still go together.",
    )
    poller_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM/stop(): how long in-flight calls may still finish."
    )
    poller_backoff_initial_s: float = Field(
        0.1, gt=0, description="First wait before retrying an unreachable broker."
    )
    poller_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest wait between retries of an unreachable broker."
    )
    poller_sub_rlms: bool = Field(
        True,
        description="Answer rlm_query below max_depth with sub-RLMs (environment, runtime and "
        "trajectory directory from the RLM_* settings of the RLM loop); off: such calls are "
        "answered with error sub_rlm_unavailable.",
    )
    poller_sub_rlm_environments: Annotated[tuple[str, ...], NoDecode] = Field(
        ("pyodide", "remote"),
        description="Comma-separated environments a sub-RLM may take from its run's session "
        "metadata, besides RLM_ENVIRONMENT (always allowed). `local` runs model code in the "
        "poller's process: list it only when every tenant is trusted.",
    )
    poller_run_budget_idle_s: float = Field(
        3600.0,
        gt=0,
        description="Budgets of runs living in other processes are tracked from their session "
        "metadata until this long without a call of theirs.",
    )
    poller_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port at /metrics (unset: no endpoint; "
        "0: a free port).",
    )
    poller_metrics_host: str = Field(
        "0.0.0.0",  # noqa: S104 - a scrape target (opt-in: the port is unset by default)
        description="Address the metrics endpoint listens on.",
    )

    @field_validator("poller_sub_rlm_environments", mode="before")
    @classmethod
    def _split_environments(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_urls(cls, value: str) -> str:
        urls = _split_urls(value)
        if not urls:
            raise ValueError("RLM_BROKER_URL needs at least one URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"RLM_BROKER_URL: {url!r} is not an http(s) URL")
        return value

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """The broker URLs, in the order they are tried."""
        return _split_urls(self.broker_url)

    @model_validator(mode="after")
    def _consistent(self) -> PollerSettings:
        if self.poller_tenant_concurrency > self.poller_concurrency:
            # A per-tenant limit above the global one is meaningless; cap it, do not fail.
            object.__setattr__(self, "poller_tenant_concurrency", self.poller_concurrency)
        if self.poller_backoff_initial_s > self.poller_backoff_max_s:
            raise ValueError(
                "RLM_POLLER_BACKOFF_INITIAL_S must not exceed RLM_POLLER_BACKOFF_MAX_S"
            )
        return self

    def token(self) -> SecretStr:
        """The token to poll with: the tenant token if set, else the admin token."""
        token = self.tenant_token or self.admin_token
        if token is None:
            raise PollerConfigError("set RLM_TENANT_TOKEN or RLM_ADMIN_TOKEN for the poller")
        return token


def _split_urls(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
