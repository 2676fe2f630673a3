"""Settings of the runtime service (`rlm sandbox`), read once at start from RLM_SANDBOX_*."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rlm_wire.runtime_models import Limits
from rlm_wire.serving import SANDBOX_PORT

_MiB = 2**20

#: Why a runtime will not start without a token (one line, for `rlm sandbox` and create_app).
NO_BEARER_MESSAGE = (
    "RLM_SANDBOX_TOKEN is required: the sandbox runtime always asks for a bearer token; set it "
    "to a random secret, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
)


def _core_count() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """`Limits` with every field resolved: what a session (or a stateless call) runs under."""

    timeout_s: float
    memory_bytes: int
    output_bytes: int
    idle_ttl_s: float


class RuntimeSettings(BaseSettings):
    """Everything the runtime service is configured by; built once and passed down."""

    model_config = SettingsConfigDict(env_prefix="RLM_SANDBOX_", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface the HTTP API listens on.")
    port: int = Field(
        SANDBOX_PORT,
        ge=0,
        le=65535,
        description="Port of the HTTP API, for `rlm sandbox` and `rlm up` (0: any free one).",
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token the host side must present. Required: the runtime refuses "
        "to start without one (`rlm up` makes its own).",
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("sandbox", "rlm-sandbox", "*.svc.cluster.local"),
        description="Comma-separated names the API answers to in the `Host` header, besides "
        "localhost, 127.0.0.1, ::1 and RLM_SANDBOX_HOST (`*.example.com` matches subdomains). "
        "The default names the runtime's service in docker-compose.yml (`sandbox`) and in "
        "deploy/k8s (`rlm-sandbox`, and any in-cluster name). Others get 400 host_not_allowed, "
        "which stops DNS rebinding; /health and /metrics answer any Host (probes and scrapers "
        "call pod IPs).",
    )
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated browser origins (scheme://host[:port]) allowed to call "
        "the API. A request with any other `Origin` header gets 403 origin_not_allowed; the "
        "default allows none (the API is for services, not browsers).",
    )

    loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="Event loop of the service: uvloop (faster bridge and HTTP), or the stdlib "
        "asyncio loop.",
    )

    pool_size: int = Field(2, ge=0, le=256, description="Pre-started sandboxes kept ready.")
    max_concurrent_spawns: int = Field(
        default_factory=_core_count,
        ge=1,
        description="Sandbox start-ups running at once (start-up is CPU-bound): the core count.",
    )
    max_sessions: int = Field(
        200, ge=1, description="Sessions (live and hibernated) held at once; more are refused."
    )
    max_live_sessions: int = Field(
        64,
        ge=1,
        description="Sessions holding a process at once; beyond it the least recently used "
        "idle session is hibernated early.",
    )
    live_memory_bytes: int = Field(
        0,
        ge=0,
        description="Memory the live sandboxes (sessions, warm pool, stateless calls) may "
        "hold, by their measured PSS. Above it warm sandboxes are ended, then the least "
        "recently used idle sessions hibernated; the warm pool refills only while one more "
        "sandbox fits; a sandbox that cannot fit is refused with 503 sandbox_memory_exhausted. "
        "0: 60 % of the memory the runtime may use (its cgroup's memory limit, else MemTotal); "
        "/health says what it resolved to.",
    )

    default_timeout_s: float = Field(60.0, gt=0, description="Wall clock per execution.")
    default_output_bytes: int = Field(
        1 * _MiB,
        ge=1024,
        description="Cap on stdout, on stderr and on the FINAL value, each, per execution.",
    )
    default_idle_ttl_s: float = Field(
        3600.0, gt=0, description="A session idle this long is ended (live or hibernated)."
    )
    hibernate_after_s: float = Field(
        120.0, ge=0, description="A live session idle this long is hibernated (0: never)."
    )
    hibernation_dir: Path | None = Field(
        None,
        description="Where hibernation blobs past the memory budget are spilled: a private "
        "subdirectory per process (mode 0700, files 0600, removed at stop) is made in it on "
        "the first spill. Unset: `hibernation` in RLM_SANDBOX_CACHE_DIR.",
    )
    hibernation_max_blob_bytes: int = Field(
        256 * _MiB,
        ge=1024,
        description="Largest hibernation blob (compressed) of one session; a larger session "
        "is not hibernated and stays live until its idle TTL.",
    )
    hibernation_memory_bytes: int = Field(
        256 * _MiB,
        ge=0,
        description="Hibernation blobs held in memory, in total; past it blobs are spilled to "
        "files (0: every blob goes to a file).",
    )
    hibernation_disk_bytes: int = Field(
        2 * 2**30,
        ge=0,
        description="Spilled hibernation files, in total; past it (and the memory budget) a "
        "session is not hibernated and stays live until its idle TTL.",
    )
    reaper_interval_s: float = Field(
        5.0, gt=0, description="How often idle sessions are looked for (hibernate, end)."
    )

    max_body_bytes: int = Field(
        8 * _MiB, ge=1024, description="Largest request body, except contexts and snapshots."
    )
    max_context_bytes: int = Field(
        128 * _MiB,
        ge=1024,
        description="Largest body of PUT /sessions/{id}/context and of PUT /contexts/{sha256}.",
    )
    context_cache_bytes: int = Field(
        512 * _MiB,
        ge=1024,
        description="Contexts held by content hash for POST /execute (the remote placement "
        "sends each once), in total bytes; past it the least recently used are dropped (a "
        "call naming a dropped one gets 409 context_unknown and the client uploads it again).",
    )
    context_cache_entries: int = Field(
        1024, ge=1, description="Contexts held by content hash, at most (least recently used go)."
    )
    max_stateless_body_bytes: int = Field(
        128 * _MiB, ge=1024, description="Largest body of POST /execute (snapshot + context)."
    )
    max_snapshot_bytes: int = Field(
        256 * _MiB,
        ge=_MiB,
        description="Largest decompressed namespace snapshot POST /execute accepts; a larger "
        "one is refused with 413 snapshot_too_large before it reaches a sandbox.",
    )

    broker_timeout_s: float = Field(
        30.0, gt=0, description="HTTP timeout of each call to the broker (beyond long-polls)."
    )
    broker_wait_s: float = Field(
        20.0, gt=0, le=60, description="Long-poll wait of /enqueue and GET /requests/{id}."
    )
    broker_retry_deadline_s: float = Field(
        60.0,
        ge=0,
        description=(
            "How long an llm_query keeps retrying an unreachable broker (or a 429/503) "
            "before model code sees an LLMQueryError; 0: no retries."
        ),
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On stop, how long running executions may finish."
    )

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def bearer_token(self) -> bytes:
        """The token every API call must present; ValueError(NO_BEARER_MESSAGE) if none is set."""
        secret = self.token.get_secret_value() if self.token is not None else ""
        if not secret.strip():
            raise ValueError(NO_BEARER_MESSAGE)
        return secret.encode()

    def limits(self, requested: Limits, *, memory_bytes: int) -> SessionLimits:
        """`requested` with every unset field filled from the defaults.

        The default memory bound is the worker layer's (`RLM_SANDBOX_MEMORY_BYTES`).
        """
        return SessionLimits(
            timeout_s=requested.timeout_s or self.default_timeout_s,
            memory_bytes=requested.memory_bytes or memory_bytes,
            output_bytes=requested.output_bytes or self.default_output_bytes,
            idle_ttl_s=requested.idle_ttl_s or self.default_idle_ttl_s,
        )
