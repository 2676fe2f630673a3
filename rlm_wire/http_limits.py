"""What a hostile HTTP client may hold: the bounds every service's server enforces.

`HttpLimits` (RLM_HTTP_*) is read once per service start by `rlm_wire.serving.uvicorn_config`;
`rlm_wire.http_guard` enforces it on every connection. `ConnectionGate` counts connections per
client address and in total, so that one client cannot take the file descriptors everyone
needs; `connection_budget` keeps the total below the process's descriptor limit (raising the
soft limit to the hard one first), with room left for Redis, sandboxes and log files.
"""

from __future__ import annotations

import logging
import resource
import time

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

_KiB = 1024
#: Ceiling when raising an unlimited hard RLIMIT_NOFILE (the kernel refuses "unlimited").
_NOFILE_CEILING = 1 << 20
#: At most one log line per this many seconds about refused connections (an attacker opening
#: thousands per second must not turn the log into a second denial of service).
_REFUSAL_LOG_INTERVAL_S = 10.0


class HttpLimits(BaseSettings):
    """Bounds on what one HTTP client may hold of a service; the same for every service."""

    model_config = SettingsConfigDict(env_prefix="RLM_HTTP_", frozen=True, extra="ignore")

    max_head_bytes: int = Field(
        16 * _KiB,
        ge=1 * _KiB,
        le=16 * 1024 * _KiB,
        description="Longest request head (request line and headers) a service reads; a "
        "longer one is answered 431 and the connection closed. Our clients send well under "
        "2 KiB; each connection still receiving its head may hold this much memory.",
    )
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request head (and a new connection's first request) must arrive within "
        "this; otherwise 408 (or, if nothing was sent, a close).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A request body must arrive within this of its head; otherwise 408 and "
        "the connection is closed. Waiting for the answer is not bounded by it.",
    )
    max_connections_per_client: int = Field(
        2048,
        ge=1,
        description="Open connections one client address may hold; more are closed at once. "
        "A sandbox runtime's host or a reverse proxy is one address for all of its sessions: "
        "raise it behind a proxy.",
    )
    max_connections: int = Field(
        8192,
        ge=1,
        description="Open connections in total per service; more are closed at once. Lowered "
        "at start to the descriptor limit (RLIMIT_NOFILE, soft raised to hard) minus "
        "RLM_HTTP_FD_RESERVE.",
    )
    fd_reserve: int = Field(
        256,
        ge=16,
        description="File descriptors kept out of the connection budget, for the service's "
        "own files, Redis connections and sandbox processes.",
    )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one where allowed; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise RLIMIT_NOFILE", extra={"soft": soft, "error": str(exc)})
    return _NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_budget(limits: HttpLimits) -> int:
    """How many connections a service may hold: `max_connections`, below the fd limit."""
    room = raise_fd_limit() - limits.fd_reserve
    if room < limits.max_connections:
        logger.warning(
            "RLIMIT_NOFILE lowers RLM_HTTP_MAX_CONNECTIONS",
            extra={"max_connections": max(1, room), "configured": limits.max_connections},
        )
    return max(1, min(limits.max_connections, room))


class ConnectionGate:
    """Open connections per client address and in total, for one server (one event loop).

    `admit` is called as a connection is accepted and `release` as it ends; a refused one is
    closed before it costs anything more. An empty address (a unix socket peer) counts only
    toward the total.
    """

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.open = 0
        self._by_client: dict[str, int] = {}
        self._refused = 0
        self._logged_at = -_REFUSAL_LOG_INTERVAL_S

    def admit(self, client: str) -> bool:
        if self.open >= self.total:
            return self._refuse("total")
        if client:
            held = self._by_client.get(client, 0)
            if held >= self.per_client:
                return self._refuse("per client")
            self._by_client[client] = held + 1
        self.open += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        if client:
            held = self._by_client[client] - 1
            if held:
                self._by_client[client] = held
            else:
                del self._by_client[client]

    def _refuse(self, which: str) -> bool:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_INTERVAL_S:
            logger.warning(
                "connections refused over the %s limit",
                which,
                extra={"refused": self._refused, "open": self.open},
            )
            self._logged_at = now
            self._refused = 0
        return False
