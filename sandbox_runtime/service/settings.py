"""Settings of the runtime service (`rlm sandbox`), read once at start from RLM_SANDBOX_*."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_wire.runtime_models import Limits
from rlm_wire.serving import SANDBOX_PORT

_MiB = 2**20


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
        description="Bearer token the host side must present. Required unless the service "
        "listens on loopback only.",
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

    default_timeout_s: float = Field(60.0, gt=0, description="Wall clock per execution.")
    default_output_bytes: int = Field(
        1 * _MiB, ge=1024, description="Cap on stdout and on stderr, each, per execution."
    )
    default_idle_ttl_s: float = Field(
        3600.0, gt=0, description="A session idle this long is ended (live or hibernated)."
    )
    hibernate_after_s: float = Field(
        120.0, ge=0, description="A live session idle this long is hibernated (0: never)."
    )
    hibernation_dir: Path | None = Field(
        None, description="Where hibernated sessions are written; unset: kept in memory."
    )
    reaper_interval_s: float = Field(
        5.0, gt=0, description="How often idle sessions are looked for (hibernate, end)."
    )

    max_body_bytes: int = Field(
        8 * _MiB, ge=1024, description="Largest request body, except contexts and snapshots."
    )
    max_context_bytes: int = Field(
        128 * _MiB, ge=1024, description="Largest body of PUT /sessions/{id}/context."
    )
    max_stateless_body_bytes: int = Field(
        128 * _MiB, ge=1024, description="Largest body of POST /execute (snapshot + context)."
    )

    broker_timeout_s: float = Field(
        30.0, gt=0, description="HTTP timeout of each call to the broker (beyond long-polls)."
    )
    broker_wait_s: float = Field(
        20.0, gt=0, le=60, description="Long-poll wait of /enqueue and GET /requests/{id}."
    )
    broker_retries: int = Field(
        3, ge=0, description="Retries of idempotent broker calls on connection errors."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On stop, how long running executions may finish."
    )

    @model_validator(mode="after")
    def _token_unless_loopback(self) -> RuntimeSettings:
        if self.token is None and not _is_loopback(self.host):
            raise ValueError(
                f"RLM_SANDBOX_TOKEN is required when listening on {self.host!r} (not loopback)"
            )
        return self

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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
