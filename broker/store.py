"""All Redis access of the broker: tenants, sessions, requests, leases and results.

Handlers call this; it alone knows key names (through `Keys`) and scripts. Results and
request bodies are stored as the JSON they are sent as, so the hot path re-serialises
nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT

from broker.auth import hash_token, new_id, new_token
from broker.batching import TickBatcher
from broker.codec import optional_bytes, text
from broker.keys import CONSUMER, GROUP, Keys
from broker.parking import LongPoll, Parking
from broker.scripts import Scripts
from broker.settings import BrokerSettings
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.run_info import RunInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """One leased request, as `claim.lua` returns it."""

    id: str
    attempt: int
    body: bytes
    session_id: str
    enqueued_at: float
    metadata: bytes


@dataclass(frozen=True)
class Accepted:
    """Outcome of one answer: its status, and when it was enqueued if it was accepted."""

    status: str
    enqueued_at: float | None = None


@dataclass(frozen=True)
class StoredResult:
    """A request as a reader sees it: its tenant, session, status and result JSON."""

    tenant_id: str
    session_id: str
    status: str
    result: bytes | None


@dataclass(frozen=True)
class _EnqueueCall:
    """One /enqueue as `enqueue.lua` takes it (several run in one script)."""

    session_id: str
    items: Sequence[tuple[str, str]]
    idempotency_key: str | None


@dataclass(frozen=True)
class PollerSeen:
    """A poller's `X-RLM-Poller` name, and the tenant it drains (None: admin, all)."""

    tenant_id: str | None
    name: str


_RESULT_FIELDS = ["status", "session", "result"]


def _claimed(flat: Sequence[Any]) -> list[Claimed]:
    """The flat 6-tuples `lease.lua` returns."""
    return [
        Claimed(
            id=flat[i].decode(),
            attempt=int(flat[i + 1]),
            body=flat[i + 2],
            session_id=flat[i + 3].decode(),
            enqueued_at=float(flat[i + 4]),
            metadata=flat[i + 5],
        )
        for i in range(0, len(flat), 6)
    ]


def _stored(tenant_id: str, fields: Sequence[Any]) -> StoredResult | None:
    """A request's `_RESULT_FIELDS` as read from Redis; None when it does not exist."""
    status, session, result = fields
    if status is None:
        return None
    return StoredResult(tenant_id, text(session), text(status), optional_bytes(result))


#: Retry-After of a tenant over its in-flight or queued-bytes quota: answers free room fast.
QUOTA_RETRY_AFTER_S = 2


def quota_exceeded(message: str, retry_after_s: int) -> ApiError:
    """429 `quota_exceeded`, with the seconds after which a retry may succeed."""
    return ApiError(
        429,
        ErrorCode.QUOTA_EXCEEDED,
        message,
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


def error_result(request_id: str, code: str, message: str) -> str:
    return json.dumps(
        {"id": request_id, "status": "error", "error": {"code": code, "message": message}}
    )


def _no_announcement(tenant_id: str, count: int) -> None:
    """The default of `Store(announce=)`: nobody on this replica waits for work."""


class Store:
    """Redis operations of one broker replica (`replica_id` names its reply channel)."""

    def __init__(
        self,
        redis: Redis,
        settings: BrokerSettings,
        replica_id: str,
        listening: Callable[[], bool] = lambda: False,
        announce: Callable[[str, int], None] = _no_announcement,
        parking: Parking | None = None,
    ) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.settings = settings
        self.replica_id = replica_id
        #: Whether this replica's own subscription to the work channel is up (its listener
        #: says): `enqueue.lua` announces work only when another replica listens.
        self._listening = listening
        #: Wakes this replica's long-polls for `count` new requests of a tenant (those of an
        #: enqueue script that were not handed off): `WorkSignals.notify`.
        self._announce = announce
        #: This replica's long-polls parked for work (`broker.parking`; the ones `announce`
        #: wakes), which an enqueue may hand its work to. None: nobody parks here.
        self.parking = parking if parking is not None else Parking()
        self.scripts = Scripts.register(redis)
        self._enqueues: TickBatcher[str, _EnqueueCall, bytes | str | int] = TickBatcher(
            self._enqueue_many,
            max_calls=settings.enqueue_coalesce_calls,
            max_weight=settings.enqueue_coalesce_bytes,
        )
        self._replies_prefix = self.keys.reply_channel("")
        self._lease_ms = str(int(settings.lease_s * 1000))
        self._reap_ms = str(max(50, min(1000, int(settings.lease_s * 250))))
        self._undeliverable = error_result(
            "__ID__",
            ErrorCode.UNDELIVERABLE,
            f"no poller answered within {settings.max_attempts} deliveries",
        )
        self._session_gone = error_result(
            "__ID__",
            ErrorCode.SESSION_EXPIRED,
            "the request's session expired (or was closed) before it was answered",
        )
        #: The arguments `lease.lua` takes after the lease itself, in its order (claim.lua
        #: and an enqueue's hand-off alike): max attempts, the reap interval, where results
        #: go and for how long, and the two results it records instead of a lease. Made once:
        #: every claim and every hand-off sends them.
        self._lease_outcomes: tuple[str | int | float, ...] = (
            settings.max_attempts,
            self._reap_ms,
            self._replies_prefix,
            settings.result_ttl_s,
            self._undeliverable,
            self._session_gone,
        )

    # --- tenants and sessions ---------------------------------------------------------------

    async def create_tenant(self, name: str) -> tuple[str, str]:
        tenant_id, token = new_id("t"), new_token("tenant")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.tenant(tenant_id), mapping={"name": name, "created_at": time.time()}
            )
            pipe.hset(
                self.keys.token(hash_token(token)), mapping={"kind": "tenant", "tenant": tenant_id}
            )
            pipe.sadd(self.keys.tenants(), tenant_id)
            pipe.xgroup_create(self.keys.stream(tenant_id), GROUP, id="0", mkstream=True)
            await pipe.execute()
        return tenant_id, token

    async def tenant_exists(self, tenant_id: str) -> bool:
        return bool(await self.redis.sismember(self.keys.tenants(), tenant_id))

    async def tenant_ids(self) -> list[str]:
        return sorted(text(m) for m in await self.redis.smembers(self.keys.tenants()))

    async def create_session(
        self, tenant_id: str, ttl_s: int, metadata: RunInfo | None
    ) -> tuple[str, str, float]:
        """Open a session: 413 for metadata over its limit, 429 past the tenant's quota."""
        metadata_json = (
            metadata.model_dump_json(exclude_none=True) if metadata is not None else "{}"
        )
        limit = self.settings.max_session_metadata_bytes
        if len(metadata_json) > limit:
            raise ApiError(
                413,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"session metadata of {len(metadata_json)} bytes exceeds {limit} "
                "(RLM_MAX_SESSION_METADATA_BYTES)",
            )
        session_id, token = new_id("s"), new_token("session")
        now = time.time()
        expires_at = now + ttl_s
        retry_after = int(
            await self.scripts.open_session(
                keys=[self.keys.sessions(tenant_id)],
                args=[now, self.settings.tenant_max_sessions, session_id, expires_at],
            )
        )
        if retry_after > 0:
            raise quota_exceeded(
                f"the tenant has {self.settings.tenant_max_sessions} sessions open "
                "(RLM_TENANT_MAX_SESSIONS); close one",
                retry_after,
            )
        token_hash = hash_token(token)
        session_key = self.keys.session(tenant_id, session_id)
        token_key = self.keys.token(token_hash)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                session_key,
                mapping={
                    "status": "active",
                    "expires_at": expires_at,
                    "metadata": metadata_json,
                    "token_hash": token_hash,
                },
            )
            # The session outlives its token so that late answers still find its metadata.
            pipe.expire(session_key, ttl_s + self.settings.request_ttl_s)
            pipe.hset(
                token_key, mapping={"kind": "session", "tenant": tenant_id, "session": session_id}
            )
            pipe.expire(token_key, ttl_s)
            await pipe.execute()
        return session_id, token, expires_at

    async def close_session(self, tenant_id: str, session_id: str) -> tuple[int, str | None]:
        """Revoke the session's token and fail its open requests; (failed count, token hash)."""
        session_key = self.keys.session(tenant_id, session_id)
        token_hash = await self.redis.hget(session_key, "token_hash")
        failed = await self.scripts.close(
            keys=[
                self.keys.stream(tenant_id),
                session_key,
                self.keys.session_open(tenant_id, session_id),
            ],
            args=[
                self.keys.tenant_base(tenant_id),
                GROUP,
                self._replies_prefix,
                self.settings.result_ttl_s,
                time.time(),
                error_result("__ID__", ErrorCode.SESSION_CLOSED, "the session was closed"),
                session_id,
            ],
        )
        if int(failed) < 0:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no session {session_id}")
        digest = text(token_hash) if token_hash else None
        if digest:
            await self.redis.delete(self.keys.token(digest))
        return int(failed), digest

    # --- requests ---------------------------------------------------------------------------

    async def enqueue(
        self,
        tenant_id: str,
        session_id: str,
        items: Sequence[tuple[str, str]],
        idempotency_key: str | None = None,
    ) -> list[str] | None:
        """Store and publish requests `(id, body json)`; refuse if the session is closed.

        With an `idempotency_key` seen before in this session, nothing is stored: the ids
        accepted the first time come back instead (None: these items were accepted now).
        The calls of one tenant made in the same event-loop tick run as one script.
        """
        call = _EnqueueCall(session_id, items, idempotency_key)
        weight = sum(len(body) for _, body in items)
        reply = await self._enqueues.submit(tenant_id, call, weight)
        if isinstance(reply, bytes | str):
            earlier: list[str] = json.loads(reply)
            return earlier
        accepted = int(reply)
        if accepted == -1:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "the session is closed or expired")
        if accepted == -2:
            raise ApiError(
                429,
                "too_many_requests",
                f"the session has reached its limit of {self.settings.max_open_per_session} "
                "unanswered requests (RLM_MAX_OPEN_PER_SESSION)",
            )
        if accepted == -3:
            raise quota_exceeded(
                f"the tenant has {self.settings.tenant_max_in_flight} requests in flight "
                "(RLM_TENANT_MAX_IN_FLIGHT)",
                QUOTA_RETRY_AFTER_S,
            )
        if accepted == -4:
            raise quota_exceeded(
                f"the tenant's unanswered requests hold {self.settings.tenant_max_queued_bytes}"
                " bytes (RLM_TENANT_MAX_QUEUED_BYTES)",
                QUOTA_RETRY_AFTER_S,
            )
        return None

    async def _enqueue_many(
        self, tenant_id: str, calls: list[_EnqueueCall]
    ) -> list[bytes | str | int]:
        """One `enqueue.lua` for `calls` of one tenant: a reply per call, in order.

        Long-polls of the tenant parked here are reserved before the script is sent (no
        other batch can count them) and handed what it leased for them; the requests not
        handed off are announced to this replica's long-polls (the script announces them to
        the other replicas)."""
        reserved: list[LongPoll] = []
        if self.settings.enqueue_handoff:
            reserved = self.parking.reserve(tenant_id, sum(len(c.items) for c in calls))
        leased: list[Claimed] = []
        try:
            replies, fresh, leased = await self._run_enqueue(tenant_id, calls, reserved)
        finally:
            left = self.parking.settle(reserved, leased) if reserved else []
        accepted = sum(r for r in replies if isinstance(r, int) and r > 0)
        if accepted > fresh:
            self._announce(tenant_id, accepted - fresh)
        if left:
            await self._hand_back(tenant_id, left)
        return replies

    async def _run_enqueue(
        self, tenant_id: str, calls: list[_EnqueueCall], reserved: list[LongPoll]
    ) -> tuple[list[bytes | str | int], int, list[Claimed]]:
        """`enqueue.lua`: the per-call replies, and with `reserved` long-polls to hand off
        to, how many never-delivered requests it leased for them and what it leased."""
        args: list[str | int | float] = [
            self.keys.tenant_base(tenant_id),
            tenant_id,
            self.replica_id,
            time.time(),
            self.settings.request_ttl_s,
            self.settings.max_open_per_session,
            self.keys.work_channel(),
            self.settings.idempotency_grace_s,
            self.settings.tenant_max_in_flight,
            self.settings.tenant_max_queued_bytes,
            len(calls),
            int(self._listening()),
        ]
        keys = [self.keys.stream(tenant_id)]
        for call in calls:
            keys += [
                self.keys.session(tenant_id, call.session_id),
                self.keys.session_open(tenant_id, call.session_id),
            ]
            if call.idempotency_key is not None:
                keys.append(self.keys.idempotency(tenant_id, call.session_id, call.idempotency_key))
            args += [call.session_id, int(call.idempotency_key is not None), len(call.items)]
            for request_id, body in call.items:
                args += [request_id, body]
        if not reserved:
            replies: list[Any] = await self.scripts.enqueue(keys=keys, args=args)
            return replies, 0, []
        keys += [self.keys.reap_lock(tenant_id), self.keys.reap_cursor(tenant_id)]
        args += [
            sum(parked.max_items for parked in reserved),
            GROUP,
            CONSUMER,
            self._lease_ms,
            *self._lease_outcomes,
            len(reserved),
        ]
        for parked in reserved:  # in order: `Parking.settle` hands them out the same way
            args += [parked.poll, parked.max_items]
        replies = await self.scripts.enqueue(keys=keys, args=args)
        flat = replies.pop()
        fresh = int(replies.pop())
        return replies, fresh, _claimed(flat)

    async def _hand_back(self, tenant_id: str, left: Sequence[Claimed]) -> None:
        """Release what was leased for long-polls that left during their hand-off; the
        enqueues themselves succeeded, so a failure here is logged, not raised (the leases
        then expire and are delivered again after RLM_LEASE_S)."""
        try:
            await self.release(tenant_id, [item.id for item in left])
        except (RedisError, OSError) as exc:
            logger.warning(
                "handing back leases failed; they are re-delivered when they expire",
                extra={"error": f"{type(exc).__name__}: {exc}", "count": len(left)},
            )

    async def watch(self, tenant_id: str, request_id: str) -> StoredResult | None:
        """Read the request; while it is unanswered, this replica is added to its watchers
        in the same script (no gap), for as long as the request lives."""
        fields = await self.scripts.watch(
            keys=[
                self.keys.request(tenant_id, request_id),
                self.keys.watchers(tenant_id, request_id),
            ],
            args=[self.replica_id],
        )
        return _stored(tenant_id, fields)

    async def read(self, tenant_id: str, request_id: str) -> StoredResult | None:
        fields = await self.redis.hmget(self.keys.request(tenant_id, request_id), _RESULT_FIELDS)
        return _stored(tenant_id, fields)

    async def read_many(self, refs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """Result JSON (or None) of `(tenant id, request id)` pairs: used after a reconnect."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id, request_id in refs:
                pipe.hget(self.keys.request(tenant_id, request_id), "result")
            return list(await pipe.execute())

    # --- leases -----------------------------------------------------------------------------

    async def claim(
        self,
        claims: Sequence[tuple[str, int]],
        poller: PollerSeen | None = None,
        poll: str = "",
    ) -> dict[str, list[Claimed]]:
        """Lease up to `count` requests from each `(tenant, count)`: one round trip in all.

        `poller`, when given, is recorded as seen (for /health) in the same round trip.
        `poll`, the long-poll's tag (`poll_tag`; "": none), is recorded with each lease, so
        that `release_polls` can hand them back if its answer never arrives.
        """
        now = time.time()
        script = self.scripts.claim
        commands: list[list[EncodableT]] = [
            script.command(
                [
                    self.keys.stream(tenant_id),
                    self.keys.reap_lock(tenant_id),
                    self.keys.reap_cursor(tenant_id),
                ],
                [
                    self.keys.tenant_base(tenant_id),
                    GROUP,
                    CONSUMER,
                    count,
                    self._lease_ms,
                    now,
                    *self._lease_outcomes,
                    poll,
                ],
            )
            for tenant_id, count in claims
        ]
        if poller is not None:
            # Scoped by tenant and trimmed to the most recent few: a tenant naming a new
            # poller on every call cannot inflate /health's count. In the same write.
            key = self.keys.pollers(poller.tenant_id)
            commands.append(["ZADD", key, now, poller.name])
            commands.append(["ZREMRANGEBYRANK", key, 0, -self.settings.max_pollers_per_tenant - 1])
        if not commands:
            return {}
        # One write, one connection, no pipeline object: the claims (and the poller's record)
        # go as they are; a claim that met NOSCRIPT (Redis lost its scripts) ran nothing and
        # is sent again once the script is loaded.
        replies = await script.run_many(commands)
        out: dict[str, list[Claimed]] = {}
        for (tenant_id, _), flat in zip(claims, replies[: len(claims)], strict=True):
            if isinstance(flat, ResponseError) and "NOGROUP" in str(flat):
                continue  # a tenant whose stream was deleted by hand: nothing to lease
            if isinstance(flat, Exception):
                raise flat
            out[tenant_id] = _claimed(flat)
        return out

    async def release(
        self, tenant_id: str, request_ids: Sequence[str], *, delivered: bool = False
    ) -> list[str]:
        """Make leased requests deliverable again at once; per id `released`, `not_leased`
        (answered, or failed) or `not_found`. `delivered`: their poller got them and gives
        them up (POST /leases/release), so the delivery stays counted; else their long-poll
        went away before they were sent, and it is not counted."""
        keys, args = self._release_call(tenant_id, [])
        replies = await self.scripts.release(
            keys=keys, args=[*args, 0 if delivered else 1, *request_ids]
        )
        return [text(r) for r in replies]

    async def release_polls(self, tenant_ids: Sequence[str], tags: Sequence[str]) -> int:
        """Hand back at once what the long-polls `tags` (`poll_tag`) leased in each tenant
        and still hold: their answers never reached their poller. A lease since extended,
        answered, handed back or delivered again is left alone; the delivery stays counted
        (docs/protocol.md). One write for every tenant; how many were handed back."""
        if not tenant_ids or not tags:
            return 0
        script = self.scripts.release
        commands = []
        for tenant_id in tenant_ids:
            keys, args = self._release_call(tenant_id, tags)
            commands.append(script.command(keys, [*args, *tags]))
        released = 0
        for reply in await script.run_many(commands):
            if isinstance(reply, Exception):
                raise reply
            released += int(reply)
        return released

    def _release_call(
        self, tenant_id: str, tags: Sequence[str]
    ) -> tuple[list[str], list[str | int]]:
        """release.lua's keys (the poll sets of `tags`) and its arguments before the tags
        or request ids."""
        keys = [self.keys.stream(tenant_id), *(self.keys.poll(tenant_id, tag) for tag in tags)]
        args: list[str | int] = [
            self.keys.tenant_base(tenant_id),
            GROUP,
            CONSUMER,
            int(self.settings.lease_s * 1000) + 1,
            self.keys.work_channel(),
            tenant_id,
        ]
        return keys, args

    async def extend(self, tenant_id: str, request_ids: Sequence[str]) -> list[str]:
        replies = await self.scripts.extend(
            keys=[self.keys.stream(tenant_id)],
            args=[
                self.keys.tenant_base(tenant_id),
                GROUP,
                CONSUMER,
                self._replies_prefix,
                self.settings.result_ttl_s,
                time.time(),
                self._session_gone,
                *request_ids,
            ],
        )
        return [text(r) for r in replies]

    async def answer(
        self, tenant_id: str, answers: Sequence[tuple[str, str, str]]
    ) -> list[Accepted]:
        """Record `(id, "done" | "error", result json)` answers; the first answer wins.

        Waiters on other replicas are sent each accepted result; the caller resolves this
        replica's own (nothing is published to it)."""
        args: list[str | int | float] = [
            self.keys.tenant_base(tenant_id),
            GROUP,
            self._replies_prefix,
            self.settings.result_ttl_s,
            time.time(),
            len(answers),
            self.replica_id,
        ]
        for answer in answers:
            args += answer
        replies = await self.scripts.answer(keys=[self.keys.stream(tenant_id)], args=args)
        outcomes = []
        for reply in replies:
            outcome = text(reply)
            if outcome.startswith("accepted:"):
                outcomes.append(Accepted("accepted", float(outcome[9:])))
            else:
                outcomes.append(Accepted(outcome))
        return outcomes

    # --- monitoring -------------------------------------------------------------------------

    async def pollers_since(self, seconds: float) -> int:
        """Pollers (admin's and every tenant's) that called /pending in the last `seconds`."""
        now = time.time()
        keys = [self.keys.pollers()] + [self.keys.pollers(t) for t in await self.tenant_ids()]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zremrangebyscore(key, "-inf", now - 3600)
                pipe.zcount(key, now - seconds, "+inf")
            replies = await pipe.execute()
        return sum(int(count) for count in replies[1::2])

    async def queue_depths(self) -> tuple[int, int, float | None]:
        """(pending, leased, age in seconds of the oldest unanswered request) over all tenants."""
        tenants = await self.tenant_ids()
        if not tenants:
            return 0, 0, None
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id in tenants:
                stream = self.keys.stream(tenant_id)
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
                pipe.xrange(stream, count=1)
            replies = await pipe.execute(raise_on_error=False)
        unanswered = leased = 0
        oldest_ms: int | None = None
        for i in range(0, len(replies), 3):
            length, pending_info, first = replies[i : i + 3]
            if isinstance(length, Exception) or isinstance(pending_info, Exception):
                continue
            unanswered += int(length)
            leased += int(pending_info["pending"])
            if first and not isinstance(first, Exception):
                entry_ms = int(first[0][0].split(b"-")[0])
                oldest_ms = entry_ms if oldest_ms is None else min(oldest_ms, entry_ms)
        age = None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        return max(0, unanswered - leased), leased, age
