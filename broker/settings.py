"""The broker's settings: one frozen object, built once at start from `RLM_*` variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_wire.serving import BROKER_PORT


def _default_redis_dir() -> Path:
    """`$XDG_DATA_HOME/rlm-broker/redis`, else `~/.local/share/rlm-broker/redis`: the same
    base as the host's trajectories (`XDG_DATA_HOME` counts only when absolute)."""
    data_home = Path(os.environ.get("XDG_DATA_HOME", ""))
    if not data_home.is_absolute():
        data_home = Path.home() / ".local" / "share"
    return data_home / "rlm-broker" / "redis"


class BrokerSettings(BaseSettings):
    """Every knob of the broker; each field's environment variable is `RLM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_", frozen=True, extra="ignore")

    broker_port: int = Field(
        BROKER_PORT,
        ge=0,
        le=65535,
        description="Port `rlm broker` and `rlm up` serve the broker on (0: any free one).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis to use. Unset: `rlm broker` starts an embedded server on a free port.",
    )
    redis_dir: Path = Field(
        default_factory=_default_redis_dir,
        description="Data directory (created 0700) of the embedded Redis of `rlm broker` and "
        "`rlm up`: its append-only file keeps every tenant, token, session and request across "
        "restarts (default: under $XDG_DATA_HOME, else ~/.local/share). Unused with "
        "RLM_REDIS_URL.",
    )
    redis_appendfsync: Literal["everysec", "always"] = Field(
        "everysec",
        description="When the embedded Redis flushes its append-only file: `everysec` (a crash "
        "loses at most the last second of writes) or `always` (loses nothing; slower writes).",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin scope. Unset: admin endpoints refuse all."
    )
    lease_s: float = Field(
        60.0, gt=0, le=3600, description="How long a delivered request is leased."
    )
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest request body accepted (413 above)."
    )
    default_wait_s: float = Field(
        25.0, ge=0, description="Wait of /enqueue and /requests when `wait` is not given."
    )
    max_wait_s: float = Field(120.0, gt=0, le=3600, description="Largest `wait` accepted.")
    default_pending_wait_s: float = Field(25.0, ge=0, description="Default wait of /pending.")
    max_pending_batch: int = Field(256, ge=1, le=10_000, description="Largest `max` of /pending.")
    max_enqueue_batch: int = Field(1024, ge=1, description="Most requests in one /enqueue batch.")
    max_respond_batch: int = Field(
        1024,
        ge=1,
        description="Most answers in one /respond batch, and most request ids in one "
        "/leases/extend or /leases/release.",
    )
    max_open_per_session: int = Field(
        4096, ge=1, description="Unanswered requests one session may hold (429 above)."
    )
    tenant_max_sessions: int = Field(
        1000, ge=1, description="Sessions one tenant may have open at once (429 above)."
    )
    tenant_max_in_flight: int = Field(
        10_000,
        ge=1,
        description="Unanswered (queued or leased) requests of one tenant (429 above).",
    )
    tenant_max_queued_bytes: int = Field(
        256 * 2**20,
        ge=1024,
        description="Bytes of request bodies one tenant may have unanswered (429 above).",
    )
    max_session_metadata_bytes: int = Field(
        16 * 1024,
        ge=256,
        description="Largest session metadata (JSON), copied into every request (413 above).",
    )
    max_pollers_per_tenant: int = Field(
        32,
        ge=1,
        description="Distinct X-RLM-Poller names remembered per tenant (and for admin) for "
        "/health: a tenant cannot inflate the pollers count past this.",
    )
    max_abandoned_polls: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most poll ids one /pending may name in `abandoned=` (long-polls whose "
        "answer its poller never got whole; their leases are handed back at once).",
    )
    max_attempts: int = Field(
        5, ge=1, description="Deliveries of one request before it fails as undeliverable."
    )
    session_ttl_s: int = Field(86_400, gt=0, description="Default lifetime of a session token.")
    max_session_ttl_s: int = Field(7 * 86_400, gt=0, description="Longest session lifetime.")
    request_ttl_s: int = Field(
        86_400, gt=0, description="How long an unanswered request is kept before it expires."
    )
    result_ttl_s: int = Field(3600, gt=0, description="How long an answer is kept for readers.")
    idempotency_grace_s: int = Field(
        600,
        ge=0,
        description="How long an Idempotency-Key outlives its requests' results, so that a late "
        "replay is answered 410 `result_expired` at once (after that, the key is new again).",
    )
    auth_cache_s: float = Field(
        2.0, ge=0, description="How long a token lookup is cached in-process (0 disables)."
    )
    redis_timeout_s: float = Field(5.0, gt=0, description="Timeout of each Redis command.")
    redis_max_connections: int = Field(
        32, ge=2, description="Redis connections per broker process for commands (bounded pool)."
    )
    enqueue_coalesce_calls: int = Field(
        64,
        ge=1,
        description="Most /enqueue calls of one tenant made in one event-loop tick that run as "
        "one Redis script (1: one script per call).",
    )
    enqueue_coalesce_bytes: int = Field(
        2**20,
        ge=1,
        description="Most request-body bytes in one such coalesced script (a larger call runs "
        "alone).",
    )
    enqueue_handoff: bool = Field(
        True,
        description="An /enqueue leases its new work straight to a /pending long-poll parked "
        "on the same replica, in its own script (no claim script by the woken long-poll).",
    )
    work_recheck_s: float = Field(
        1.0, gt=0, description="A waiting /pending re-reads the queues at least this often."
    )
    key_prefix: str = Field("rlm", min_length=1, description="Prefix of every Redis key.")

    @property
    def default_pending_max(self) -> int:
        """`max` of /pending when not given: 32, or less if RLM_MAX_PENDING_BATCH is less."""
        return min(32, self.max_pending_batch)

    @model_validator(mode="after")
    def _consistent(self) -> BrokerSettings:
        if self.default_wait_s > self.max_wait_s or self.default_pending_wait_s > self.max_wait_s:
            raise ValueError("default waits must not exceed RLM_MAX_WAIT_S")
        if self.session_ttl_s > self.max_session_ttl_s:
            raise ValueError("RLM_SESSION_TTL_S must not exceed RLM_MAX_SESSION_TTL_S")
        return self
