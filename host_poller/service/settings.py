"""Settings of `rlm serve`: one frozen object, built once at start from `RLM_SERVE_*`.

Every request is bounded here: its body, its context, its run's iterations, depth, budget
and wall time, and how many runs go at once (429 past that).
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_wire.serving import SERVE_PORT


class ServeSettings(BaseSettings):
    """How `rlm serve` listens and bounds each run; each variable is `RLM_SERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_SERVE_", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface `rlm serve` listens on.")
    port: int = Field(
        SERVE_PORT, ge=0, le=65535, description="Port of `rlm serve` (0: any free one)."
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated bearer keys applications call `rlm serve` with (never a "
        "provider's key); their runs are RLM_TENANT_TOKEN's tenant's. Unset (and no "
        "RLM_SERVE_API_KEY, no RLM_SERVE_TENANT_TOKENS): no authentication, allowed only on a "
        "loopback host.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="One static bearer key (single-tenant use): the same as a one-key "
        "RLM_SERVE_API_KEYS; both may be set.",
    )
    tenant_tokens: bool = Field(
        False,
        description="Accept the broker's tenant tokens as bearer keys (checked at the broker): "
        "a run is then opened with that token, so its sessions, quotas, metering and budgets "
        "are the tenant's, and only that token reads it. A key is then always required.",
    )
    tenant_cache_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How long the broker's verdict on a tenant token (accepted or refused) is "
        "trusted: a revoked token keeps working at most this long.",
    )
    tenant_cache_entries: int = Field(
        10_000, ge=1, le=1_000_000, description="Verdicts on tenant tokens kept (oldest dropped)."
    )
    tenant_checks_per_s: float = Field(
        10.0,
        gt=0,
        le=10_000,
        description="Tenant-token checks sent to the broker per second (bursts of as many); a "
        "key not yet known past it is refused with 429, so unknown keys cannot flood the broker.",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond)."
    )
    max_context_chars: int = Field(
        48_000_000, ge=1, description="Largest context, in characters over all its parts (413)."
    )
    max_messages: int = Field(1000, ge=1, description="Most messages in one request (400).")
    max_iterations: int = Field(
        50, ge=1, le=1000, description="Cap on a request's `max_iterations` (root turns)."
    )
    max_depth: int = Field(
        3, ge=0, le=16, description="Cap on a request's `max_depth` (recursion depth)."
    )
    max_sub_calls: int | None = Field(
        None, ge=1, description="Cap on a run's sub-calls; unset: only the request's own limit."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on a run's tokens, all depths; unset: only the request's."
    )
    max_cost_usd: float | None = Field(
        None, gt=0, description="Cap on a run's cost in USD; unset: only the request's."
    )
    run_timeout_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Wall clock of one run; past it the run is "
        "cancelled and the request answers 504 (a request's budget max_seconds is capped by it).",
    )
    concurrency: int = Field(
        4, ge=1, le=1024, description="Runs at once; one more request is refused with 429."
    )
    max_runs: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Runs of the native run API (/v1/runs) kept, finished ones included, "
        "counted in the run store: in Redis, over every replica on it; in memory, this "
        "process's (429 past it while none has expired).",
    )
    run_ttl_s: float = Field(
        3600.0, gt=0, description="How long a finished run of /v1/runs stays readable."
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis where the runs of /v1/runs are kept, so they outlive a restart "
        "and every replica on it reads, follows and cancels any of them. Unset: on its own "
        "stack, the stack's Redis; with RLM_BROKER_URL, this process's memory (a restart "
        "forgets them).",
    )
    key_prefix: str = Field(
        "rlm:serve:",
        min_length=1,
        max_length=64,
        description="Prefix of the run store's Redis keys (apart from the broker's).",
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Timeout of each call to the run store's Redis."
    )
    redis_max_connections: int = Field(
        64,
        ge=4,
        le=10_000,
        description="Connections to the run store's Redis at once (a follower of a run's "
        "events holds one while it waits); a call waits RLM_SERVE_REDIS_TIMEOUT_S for one, "
        "then gets 503.",
    )
    lease_interval_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="How often a replica renews its lease in the run store's Redis.",
    )
    lease_ttl_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="A replica's lease lasts this long unless renewed (more than "
        "RLM_SERVE_LEASE_INTERVAL_S): once it lapses (the replica crashed or was killed), its "
        "running runs are reported failed, `run_interrupted`.",
    )
    max_answer_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest answer (with its usage, as JSON) a run of /v1/runs keeps; a run "
        "whose answer is larger fails with `answer_too_large` (the trajectory has the answer).",
    )
    max_event_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest progress event of a run kept (JSON); a larger one is kept as a "
        "stub with its name and size (its whole text is in the trajectory).",
    )
    max_conversations: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Conversations (/v1/conversations) open at once; each holds a sandbox "
        "session and a broker session (429 past it).",
    )
    max_turns: int = Field(
        100, ge=1, le=10_000, description="Questions in one conversation (409 past it)."
    )
    conversation_idle_s: float = Field(
        900.0,
        gt=0,
        le=86_400,
        description="A conversation without a question for this long is closed (its REPL "
        "and broker session end).",
    )
    allow_local_environment: bool = Field(
        False,
        description="Let runs use RLM_ENVIRONMENT=local: model code then runs in this process, "
        "next to the provider's key, and an application's context can steer the model into "
        "reading it. Only for applications trusted with the key.",
    )
    heartbeat_s: float = Field(
        15.0,
        gt=0,
        le=300,
        description="A streamed answer sends an SSE comment this often "
        "while the run works, so proxies keep the connection.",
    )

    @model_validator(mode="after")
    def _lease_outlives_renewal(self) -> ServeSettings:
        if self.lease_ttl_s <= self.lease_interval_s:
            raise ValueError(
                f"RLM_SERVE_LEASE_TTL_S ({self.lease_ttl_s:g}) must exceed "
                f"RLM_SERVE_LEASE_INTERVAL_S ({self.lease_interval_s:g})"
            )
        return self

    def static_keys(self) -> tuple[str, ...]:
        """The static bearer keys (RLM_SERVE_API_KEYS and RLM_SERVE_API_KEY)."""
        listed = self.api_keys.get_secret_value().split(",") if self.api_keys is not None else []
        if self.api_key is not None:
            listed.append(self.api_key.get_secret_value())
        return tuple(dict.fromkeys(k.strip() for k in listed if k.strip()))

    def is_open(self) -> bool:
        """No key is asked of callers (no static key, no tenant tokens): loopback only."""
        return not self.static_keys() and not self.tenant_tokens

    def check(self, environment: str) -> None:
        """Raise ValueError when the settings cannot be served safely (runs in `environment`)."""
        if environment == "local" and not self.allow_local_environment:
            raise ValueError(
                "RLM_ENVIRONMENT=local runs model code in this process, next to the provider's "
                "key, and an application's context can steer the model into reading it: use "
                "pyodide or remote, or set RLM_SERVE_ALLOW_LOCAL_ENVIRONMENT=true for "
                "applications trusted with the key"
            )
        if self.is_open() and not _is_loopback(self.host):
            raise ValueError(
                f"rlm serve on {self.host} would answer anyone: set RLM_SERVE_API_KEYS "
                "(comma-separated keys) or RLM_SERVE_TENANT_TOKENS=true, or listen on 127.0.0.1"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
