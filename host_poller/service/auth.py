"""Who is calling `rlm serve`: the holder of a static key, a broker tenant, or anyone.

A bearer key is compared, in constant time, with every static key (RLM_SERVE_API_KEYS,
RLM_SERVE_API_KEY): its runs are the service's own tenant's (RLM_TENANT_TOKEN). With
RLM_SERVE_TENANT_TOKENS, any other key is checked at the broker: a tenant token's runs are
opened with that token, so their sessions, quotas, metering and the poller's budgets are
the tenant's. Without a static key and without tenant tokens the service is open (loopback
only) and every caller is the same one. A run belongs to the key that started it.

The broker check is `GET /tenants/self` with the key: a tenant token gets its tenant id,
a session token or the admin token 403, any other key 401. A session token (which
sandboxed code holds) and the admin token must never be keys here.
Verdicts, both ways, are kept `RLM_SERVE_TENANT_CACHE_S` (at most
`RLM_SERVE_TENANT_CACHE_ENTRIES` of them); checks of one key at once are one broker call;
and at most `RLM_SERVE_TENANT_CHECKS_PER_S` checks go out a second, so a flood of unknown
keys meets 401s and 429s, never a storm of broker calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

from host_poller.service.settings import ServeSettings
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError, ServiceUnreachable
from rlm_wire.transport import HttpxTransport, Transport

logger = logging.getLogger(__name__)

#: Longer keys are no one's (a broker token is ~50 characters): refused without a check.
MAX_KEY_CHARS = 512
#: The broker's answers to the check that say "not a tenant token" (see the module).
_REFUSED = frozenset({401, 403})
#: Connections kept to the broker for checks (checks are few: RLM_SERVE_TENANT_CHECKS_PER_S).
_CHECK_CONNECTIONS = 4


@dataclass(frozen=True)
class Caller:
    """Who called: `owner` is what a run records of its key (a digest, never the key)."""

    owner: str
    tenant_token: SecretStr | None = None
    """The tenant token runs are opened with; None: the service's own (RLM_TENANT_TOKEN)."""


def owner_of(key: str, kind: str = "key") -> str:
    return f"{kind}:{hashlib.sha256(key.encode()).hexdigest()}"


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    """Resolves an `Authorization` header to a `Caller` (or raises 401, 429, 503)."""

    def __init__(
        self,
        settings: ServeSettings,
        broker_url: str | None,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.tenant_tokens and broker_url is None:
            raise ValueError("RLM_SERVE_TENANT_TOKENS needs a broker to check tokens at")
        self.settings = settings
        self._keys = tuple(key.encode() for key in settings.static_keys())
        # One connection pool for every check; each check sends its own key.
        self._broker: Transport | None = (
            HttpxTransport(broker_url, None, max_connections=_CHECK_CONNECTIONS)
            if settings.tenant_tokens and broker_url is not None
            else None
        )
        self._timeout_s = timeout_s
        self._clock = clock
        self._verdicts: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._checking: dict[str, asyncio.Task[bool]] = {}
        self._allowance = max(1.0, settings.tenant_checks_per_s)
        self._refilled = clock()
        self.broker_checks = 0
        """Checks sent to the broker so far."""

    @property
    def kept_verdicts(self) -> int:
        """Verdicts on tenant tokens held (at most RLM_SERVE_TENANT_CACHE_ENTRIES)."""
        return len(self._verdicts)

    async def caller(self, authorization: str | None) -> Caller:
        if self.settings.is_open():
            return Caller(owner_of(""))
        scheme, _, given = (authorization or "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
        if self._is_static(given):
            return Caller(owner_of(given))
        if (
            self._broker is not None
            and len(given) <= MAX_KEY_CHARS
            and await self._is_tenant(given)
        ):
            return Caller(owner_of(given, "tenant"), SecretStr(given))
        raise _unauthorized(
            "unknown API key: send a key of RLM_SERVE_API_KEYS"
            + (" or a tenant token of the broker" if self._broker is not None else "")
        )

    def _is_static(self, given: str) -> bool:
        # Compared with every key, each in constant time, so timing tells nothing of them.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given.encode(), key)
        return matched

    async def _is_tenant(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._verdicts.get(digest)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._verdicts[digest]
        task = self._checking.get(digest)
        if task is None:
            self._take_check(now)
            task = asyncio.create_task(self._check(token, digest), name="rlm-serve-key-check")
            self._checking[digest] = task
            task.add_done_callback(lambda done: self._checked(digest, done))
        # Shielded: a caller that goes away does not cancel the check others wait for.
        return await asyncio.shield(task)

    def _take_check(self, now: float) -> None:
        """Spend one of the checks of RLM_SERVE_TENANT_CHECKS_PER_S (a token bucket)."""
        rate = self.settings.tenant_checks_per_s
        elapsed = max(0.0, now - self._refilled)
        self._allowance = min(max(1.0, rate), self._allowance + elapsed * rate)
        self._refilled = now
        if self._allowance < 1.0:
            raise ApiError(
                429,
                ErrorCode.TOO_MANY_REQUESTS,
                "too many unknown keys to check at the broker (RLM_SERVE_TENANT_CHECKS_PER_S); "
                "retry later",
                headers={"Retry-After": "1"},
            )
        self._allowance -= 1.0

    def _checked(self, digest: str, task: asyncio.Task[bool]) -> None:
        self._checking.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here: a check nobody awaits any more is no warning

    async def _check(self, token: str, digest: str) -> bool:
        """Ask the broker; remember its verdict. 503 when it gives none (nothing kept)."""
        assert self._broker is not None
        self.broker_checks += 1
        try:
            reply = await self._broker.request(
                "GET",
                "/tenants/self",
                None,
                timeout_s=self._timeout_s,
                headers={"Authorization": f"Bearer {token}"},
            )
        except ServiceUnreachable as exc:
            raise _unavailable(str(exc)) from exc
        if reply.status == 200:
            verdict = True
        elif reply.status in _REFUSED:
            verdict = False
        else:  # 404 (a broker without the route), 429, 5xx: no verdict
            raise _unavailable(f"status {reply.status}")
        self._remember(digest, verdict)
        return verdict

    async def aclose(self) -> None:
        for task in list(self._checking.values()):
            task.cancel()
        if self._broker is not None:
            await self._broker.aclose()

    def _remember(self, digest: str, verdict: bool) -> None:
        self._verdicts[digest] = (self._clock() + self.settings.tenant_cache_s, verdict)
        self._verdicts.move_to_end(digest)
        while len(self._verdicts) > self.settings.tenant_cache_entries:
            self._verdicts.popitem(last=False)


def _unavailable(reason: str) -> ApiError:
    logger.warning("tenant token check failed", extra={"error": reason})
    return ApiError(
        503,
        ErrorCode.UNAVAILABLE,
        "the broker cannot check the key now; retry later",
        headers={"Retry-After": "1"},
    )
