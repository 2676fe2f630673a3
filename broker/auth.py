"""Bearer tokens and the three scopes: admin, tenant, session.

Tokens are random, shown once, and stored only as SHA-256 digests. The admin token comes
from configuration and is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from broker.codec import optional_text
from broker.keys import Keys
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

Scope = Literal["admin", "tenant", "session"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the scope of the token, and the tenant and session it belongs to."""

    scope: Scope
    tenant_id: str | None = None
    session_id: str | None = None
    token_hash: str = ""

    def require(self, *scopes: Scope) -> None:
        if self.scope not in scopes:
            raise ApiError(
                403,
                "forbidden",
                f"this endpoint needs a {' or '.join(scopes)} token, not a {self.scope} token",
            )

    @property
    def tenant(self) -> str:
        """The caller's tenant id; admin tokens have none."""
        if self.tenant_id is None:
            raise ApiError(
                403, ErrorCode.FORBIDDEN, "this endpoint needs a tenant or session token"
            )
        return self.tenant_id

    @property
    def session(self) -> str:
        """The caller's session id; only session tokens have one."""
        if self.session_id is None:
            raise ApiError(403, ErrorCode.FORBIDDEN, "this endpoint needs a session token")
        return self.session_id

    def may_act_for_tenant(self, tenant_id: str) -> bool:
        return self.scope == "admin" or (self.scope == "tenant" and self.tenant_id == tenant_id)


def new_token(kind: Literal["tenant", "session"]) -> str:
    return f"rlm_{kind[0]}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


class Authenticator:
    """Resolves `Authorization: Bearer` headers to principals.

    Lookups are cached for `cache_s` seconds; a revoked session is still refused at once
    where it matters, because the enqueue script checks the session's status in Redis. The
    cache is keyed by the token itself, so a cached call hashes nothing (SHA-256 was 1-2 %
    of the broker's CPU); the admin token is never cached, it is compared in constant time.
    """

    def __init__(self, redis: Redis, keys: Keys, admin_token: str | None, cache_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._admin_digest = hash_token(admin_token) if admin_token else None
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal]] = {}  # by token
        self._tokens: dict[str, str] = {}  # digest -> token, for `forget`

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(
                401, ErrorCode.UNAUTHORIZED, "missing bearer token (Authorization: Bearer <token>)"
            )
        token = authorization[7:].strip()
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            return cached[1]
        digest = hash_token(token)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return Principal("admin", token_hash=digest)
        fields = await self._redis.hmget(self._keys.token(digest), ["kind", "tenant", "session"])
        kind, tenant_id, session_id = (optional_text(f) for f in fields)
        if kind not in ("tenant", "session"):
            self.forget(digest)
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "unknown, revoked or expired token")
        principal = Principal(kind, tenant_id, session_id, digest)  # type: ignore[arg-type]
        if self._cache_s > 0:
            if len(self._cache) > 100_000:
                self._cache.clear()
                self._tokens.clear()
            self._cache[token] = (now + self._cache_s, principal)
            self._tokens[digest] = token
        return principal

    def forget(self, token_hash: str) -> None:
        """Drop a cached token at once (after this replica revoked it)."""
        token = self._tokens.pop(token_hash, None)
        if token is not None:
            self._cache.pop(token, None)
