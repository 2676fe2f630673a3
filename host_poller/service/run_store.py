"""Where the native run API's runs are kept: one typed record per run, its events, its fate.

`RunRecord` is the stored form of a run (id, owner digest, model, times, status, answer or
error, the replica running it, its event count): `to_fields` writes it, `from_fields` reads
it, nothing else builds or parses a stored run. Events are JSON texts, the newest
`MAX_EVENTS` kept. Two stores behind one small interface (`RunStore`):

- `RedisRunStore` (RLM_SERVE_REDIS_URL; on its own stack `rlm serve` uses the stack's
  Redis): every replica on one Redis sees every run. A run is a hash, its events a capped
  stream (XADD MAXLEN), both with a TTL (a running run: its timeout plus a margin; a
  finished one: RLM_SERVE_RUN_TTL_S); a sorted set counts the runs kept for
  RLM_SERVE_MAX_RUNS. Each replica holds a lease key, renewed every
  RLM_SERVE_LEASE_INTERVAL_S: a running run whose replica's lease is gone (the process
  crashed or was killed) is read as failed, `run_interrupted`, and stored so. A cancel asked
  of a replica that does not run the run is published on a channel every replica follows,
  and flagged in a key the running replica reads at each renewal (a missed message).
- `MemoryRunStore`: one process's memory, as before (no Redis; a restart forgets).

No key or token is ever stored: a run's owner is a digest (`auth.owner_of`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from host_poller.service.errors import error_body
from host_poller.service.settings import ServeSettings
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)

Status = Literal["running", "succeeded", "failed", "cancelled"]
_STATUSES: frozenset[str] = frozenset({"running", "succeeded", "failed", "cancelled"})

#: Events kept per run (the oldest are dropped past it; `dropped_events` counts them).
MAX_EVENTS = 10_000
#: A running run's keys outlive its timeout by this much (plus the lease TTL), so a run
#: whose replica died is still read (as interrupted) after its own timeout.
RUNNING_MARGIN_S = 60.0
#: Events read from a stream at once.
_READ_BATCH = 500
#: Events (JSON texts) a callback reads back: `(cursor, text)`, the cursor to read after.
Events = list[tuple[str, str]]
#: Called with a run's id when another replica asks to cancel it.
CancelHook = Callable[[str], None]


# --- the stored form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One run as stored. `result` is the answer's wire form: `answer`, `usage`, `rlm`."""

    id: str
    owner: str
    model: str
    created: float
    replica: str
    status: Status = "running"
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    events: int = 0

    @property
    def dropped_events(self) -> int:
        return max(0, self.events - MAX_EVENTS)

    def ended(
        self,
        status: Status,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        events: int | None = None,
    ) -> RunRecord:
        return replace(self, status=status, finished=time.time(), result=result, error=error,
                       events=self.events if events is None else events)  # fmt: skip

    def interrupted(self) -> RunRecord:
        """The run as failed because the service running it stopped (it is not re-run: a
        second run would pay the LLM twice)."""
        message = (
            "the rlm serve replica running this run stopped (crashed, killed or restarted) "
            "before it ended; it was not re-run"
        )
        body = error_body(502, ErrorCode.RUN_INTERRUPTED, message)["error"]
        return self.ended("failed", error=body)

    def to_json(self) -> dict[str, Any]:
        """The run as the API answers it."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "rlm.run",
            "model": self.model,
            "status": self.status,
            "created": int(self.created),
            "events": self.events,
        }
        if self.result is not None:
            body.update(self.result)
        if self.error is not None:
            body["error"] = self.error
        return body

    def to_fields(self) -> dict[str, str]:
        """The writer: the record as a Redis hash (every value a string)."""
        fields = {
            "id": self.id,
            "owner": self.owner,
            "model": self.model,
            "created": repr(self.created),
            "replica": self.replica,
            "status": self.status,
            "events": str(self.events),
            "finished": "" if self.finished is None else repr(self.finished),
            "result": "" if self.result is None else json.dumps(self.result),
            "error": "" if self.error is None else json.dumps(self.error),
        }
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> RunRecord:
        """The reader of `to_fields`' hash; ValueError for one it did not write."""
        try:
            status = fields["status"]
            if status not in _STATUSES:
                raise ValueError(f"unknown status {status!r}")
            return cls(
                id=fields["id"],
                owner=fields["owner"],
                model=fields["model"],
                created=float(fields["created"]),
                replica=fields["replica"],
                status=cast(Status, status),
                finished=float(fields["finished"]) if fields.get("finished") else None,
                result=json.loads(fields["result"]) if fields.get("result") else None,
                error=json.loads(fields["error"]) if fields.get("error") else None,
                events=int(fields.get("events") or 0),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a stored run: {exc}") from exc


@dataclass(frozen=True)
class RunKeys:
    """The Redis keys of the run store, under RLM_SERVE_KEY_PREFIX."""

    prefix: str

    def run(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def events(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:events"

    def index(self) -> str:
        """Sorted set of the runs kept, scored by when they expire (RLM_SERVE_MAX_RUNS)."""
        return f"{self.prefix}runs"

    def lease(self, replica: str) -> str:
        return f"{self.prefix}replica:{replica}"

    def cancels(self) -> str:
        """The pub/sub channel of cancels, each message a run's id."""
        return f"{self.prefix}cancel"

    def cancel(self, run_id: str) -> str:
        """A run's cancel flag: what a replica that missed the message reads."""
        return f"{self.prefix}cancel:{run_id}"


class RunsFull(Exception):
    """RLM_SERVE_MAX_RUNS runs are kept already."""

    def __init__(self, kept: int) -> None:
        super().__init__(f"{kept} runs are kept")
        self.kept = kept


# --- the interface -----------------------------------------------------------------------------


class RunStore(abc.ABC):
    """Runs, their events and cancels, as one service (or all its replicas) sees them."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.replica = uuid.uuid4().hex
        """This process: a run records the replica that runs it."""

    @property
    def running_ttl_s(self) -> float:
        return self.settings.run_timeout_s + self.settings.lease_ttl_s + RUNNING_MARGIN_S

    @abc.abstractmethod
    async def open(self, on_cancel: CancelHook) -> None:
        """Start whatever the store needs; `on_cancel` gets the runs other replicas cancel."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop; the runs of this replica are already stored as ended."""

    @abc.abstractmethod
    async def add(self, record: RunRecord) -> None:
        """Keep a new run; `RunsFull` past RLM_SERVE_MAX_RUNS."""

    @abc.abstractmethod
    async def append(self, run_id: str, events: list[str]) -> None:
        """Add events (JSON texts) to a run, dropping the oldest past MAX_EVENTS."""

    @abc.abstractmethod
    async def finish(self, record: RunRecord) -> None:
        """Store an ended run, kept RLM_SERVE_RUN_TTL_S from now; `ApiError` (503) while
        the store is unreachable."""

    @abc.abstractmethod
    async def get(self, run_id: str) -> RunRecord | None:
        """The run (a running one whose replica is gone: as interrupted), or None."""

    @abc.abstractmethod
    async def read_events(self, run_id: str, after: str, wait_s: float) -> Events:
        """The run's events after cursor `after` ("0": from the first kept), waiting up to
        `wait_s` for one when there is none yet."""

    @abc.abstractmethod
    async def request_cancel(self, run_id: str) -> None:
        """Ask the replica running `run_id` to cancel it (a run of another replica)."""


# --- in memory ---------------------------------------------------------------------------------


@dataclass
class _Kept:
    record: RunRecord
    events: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        # Followers wait on `changed`; a new Event for the next change, the old one set.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class MemoryRunStore(RunStore):
    """One process's runs (no Redis): a restart forgets them."""

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        self._runs: dict[str, _Kept] = {}

    async def add(self, record: RunRecord) -> None:
        cutoff = time.time() - self.settings.run_ttl_s
        for run_id in [i for i, k in self._runs.items()
                       if k.record.finished and k.record.finished < cutoff]:  # fmt: skip
            del self._runs[run_id]
        if len(self._runs) >= self.settings.max_runs:
            raise RunsFull(len(self._runs))
        self._runs[record.id] = _Kept(record)

    async def append(self, run_id: str, events: list[str]) -> None:
        kept = self._runs.get(run_id)
        if kept is None:
            return
        kept.events.extend(events)
        del kept.events[:-MAX_EVENTS]
        kept.record = replace(kept.record, events=kept.record.events + len(events))
        kept.wake()

    async def finish(self, record: RunRecord) -> None:
        kept = self._runs.get(record.id)
        if kept is not None:
            kept.record = replace(record, events=kept.record.events)
            kept.wake()

    async def get(self, run_id: str) -> RunRecord | None:
        kept = self._runs.get(run_id)
        return kept.record if kept is not None else None

    async def read_events(self, run_id: str, after: str, wait_s: float) -> Events:
        kept = self._runs.get(run_id)
        if kept is None:
            return []
        changed = kept.changed  # taken before reading, so no change is missed in between
        events = self._after(kept, int(after))
        if not events and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=wait_s)
            events = self._after(kept, int(after))
        return events

    async def open(self, on_cancel: CancelHook) -> None:
        """Nothing to start: every run is this process's (cancelled here, never elsewhere)."""

    async def aclose(self) -> None:
        """Nothing to stop: the runs go with the process."""

    async def request_cancel(self, run_id: str) -> None:
        """Never called: no other replica runs a run kept here."""

    @staticmethod
    def _after(kept: _Kept, seen: int) -> Events:
        first = kept.record.events - len(kept.events)  # the number of the first kept event
        start = max(0, seen - first)
        return [(str(first + i + 1), text) for i, text in enumerate(kept.events[start:], start)]


# --- in Redis ----------------------------------------------------------------------------------

#: Adds a run unless RLM_SERVE_MAX_RUNS are kept: -1 when added, else how many are kept.
#: The replica's lease is renewed with it: no run is stored under a lapsed lease (read at
#: once as interrupted), whatever the lease loop's last renewal did.
#: KEYS: index, run, lease. ARGV: now, max_runs, expires_at, ttl_ms, run id, lease_ms,
#: fields...
_ADD = """
redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local kept = redis.call('ZCARD', KEYS[1])
if kept >= tonumber(ARGV[2]) then return kept end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[5])
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return -1
"""
#: Stores a running run as interrupted if its replica's lease is (still) gone: 1 if it did.
#: KEYS: run, events, lease, index. ARGV: replica, expires_at, ttl_ms, run id, fields...
_INTERRUPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'replica') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[4])
return 1
"""


def _flat(fields: Mapping[str, str]) -> list[str]:
    return [part for item in fields.items() for part in item]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@contextlib.contextmanager
def _reachable(*, quiet: bool = False) -> Iterator[None]:
    """A Redis failure, where a request meets it, as 503 (the run store is unreachable);
    `quiet` where the caller logs it (once, not at every retry)."""
    try:
        yield
    except RedisError as exc:
        if not quiet:
            logger.warning("run store unreachable", extra={"error": type(exc).__name__})
        raise ApiError(
            503,
            ErrorCode.UNAVAILABLE,
            "the run store (RLM_SERVE_REDIS_URL) is unreachable; retry later",
            headers={"Retry-After": "1"},
        ) from exc


class RedisRunStore(RunStore):
    """Runs in Redis, shared by every replica on it (see the module)."""

    def __init__(self, settings: ServeSettings, url: str) -> None:
        super().__init__(settings)
        self.keys = RunKeys(settings.key_prefix)
        timeout = settings.redis_timeout_s
        # Bounded: each follower of a run's events holds a connection while it waits.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=timeout,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.redis: Redis = Redis.from_pool(pool)
        self._add = self.redis.register_script(_ADD)
        self._interrupt = self.redis.register_script(_INTERRUPT)
        self._tasks: list[asyncio.Task[None]] = []
        self._mine: set[str] = set()
        """The runs this replica runs: their cancel flags are read with every renewal."""

    async def open(self, on_cancel: CancelHook) -> None:
        # A Redis not (yet) reachable does not stop the service: requests meet 503 until it
        # is, the lease loop and the cancel channel keep trying.
        try:
            await self._renew()
        except RedisError as exc:
            logger.error(
                "run store unreachable (RLM_SERVE_REDIS_URL); retrying",
                extra={"error": type(exc).__name__},
            )
        self._tasks = [
            asyncio.create_task(self._keep_lease(on_cancel), name="rlm-serve-lease"),
            asyncio.create_task(self._follow_cancels(on_cancel), name="rlm-serve-cancels"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.keys.lease(self.replica))
        except RedisError as exc:  # its TTL ends it
            logger.warning("lease not released", extra={"error": type(exc).__name__})
        await self.redis.aclose()

    async def _renew(self) -> None:
        lease_ms = _ms(self.settings.lease_ttl_s)
        await self.redis.set(self.keys.lease(self.replica), "1", px=lease_ms)

    async def _keep_lease(self, on_cancel: CancelHook) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_interval_s)
            try:
                await self._renew()
                # A cancel whose message this replica missed (its channel was down) is
                # still flagged: it takes effect one renewal later.
                mine = sorted(self._mine)
                flags = await self.redis.mget([self.keys.cancel(i) for i in mine]) if mine else []
            except RedisError as exc:  # retried next interval; the TTL allows a few misses
                logger.warning("lease not renewed", extra={"error": type(exc).__name__})
                continue
            for run_id, flag in zip(mine, flags, strict=True):
                if flag is not None:
                    on_cancel(run_id)

    async def _follow_cancels(self, on_cancel: CancelHook) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            while True:
                try:
                    if not pubsub.subscribed:  # (redis-py resubscribes when it reconnects)
                        await pubsub.subscribe(self.keys.cancels())
                    message = await pubsub.get_message(timeout=1.0)
                except RedisError as exc:
                    logger.warning("cancel channel lost", extra={"error": type(exc).__name__})
                    await asyncio.sleep(self.settings.lease_interval_s)
                    continue
                if message is not None and message.get("type") == "message":
                    on_cancel(str(message["data"]))
        finally:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # (untyped in redis-py)

    async def add(self, record: RunRecord) -> None:
        now = time.time()
        ttl_s = self.running_ttl_s
        with _reachable():
            kept = await self._add(
                keys=[self.keys.index(), self.keys.run(record.id), self.keys.lease(self.replica)],
                args=[now, self.settings.max_runs, now + ttl_s, _ms(ttl_s), record.id,
                      _ms(self.settings.lease_ttl_s), *_flat(record.to_fields())],
            )  # fmt: skip
        if int(kept) >= 0:
            raise RunsFull(int(kept))
        self._mine.add(record.id)

    async def append(self, run_id: str, events: list[str]) -> None:
        stream = self.keys.events(run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for text in events:
                pipe.xadd(stream, {"e": text}, maxlen=MAX_EVENTS, approximate=False)
            pipe.hincrby(self.keys.run(run_id), "events", len(events))
            # NX: only a key without a TTL gets one (the stream's first events; a record
            # gone meanwhile, which HINCRBY made again) -- never one left unbounded.
            pipe.pexpire(stream, _ms(self.running_ttl_s), nx=True)
            pipe.pexpire(self.keys.run(run_id), _ms(self.running_ttl_s), nx=True)
            await pipe.execute()

    async def finish(self, record: RunRecord) -> None:
        self._mine.discard(record.id)
        ttl_ms = _ms(self.settings.run_ttl_s)
        fields = record.to_fields()
        del fields["events"]  # counted by `append`, which may have run past this copy
        with _reachable(quiet=True):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.run(record.id), mapping=cast(dict[Any, Any], fields))
                pipe.pexpire(self.keys.run(record.id), ttl_ms)
                pipe.pexpire(self.keys.events(record.id), ttl_ms)
                pipe.zadd(self.keys.index(), {record.id: time.time() + self.settings.run_ttl_s})
                pipe.delete(self.keys.cancel(record.id))
                await pipe.execute()

    async def get(self, run_id: str) -> RunRecord | None:
        with _reachable():
            record = await self._read(run_id)
            if record is None or record.status != "running" or record.replica == self.replica:
                return record
            if await self.redis.exists(self.keys.lease(record.replica)):
                return record
            stopped = record.interrupted()
            marked = await self._interrupt(
                keys=[self.keys.run(run_id), self.keys.events(run_id),
                      self.keys.lease(record.replica), self.keys.index()],
                args=[record.replica, time.time() + self.settings.run_ttl_s,
                      _ms(self.settings.run_ttl_s), run_id,
                      *_flat({k: v for k, v in stopped.to_fields().items() if k != "events"})],
            )  # fmt: skip
            if marked:  # (else another reader, or the run's own end, came first)
                logger.warning("run interrupted: its replica is gone", extra={"id": run_id})
            return await self._read(run_id)

    async def _read(self, run_id: str) -> RunRecord | None:
        fields = await self.redis.hgetall(self.keys.run(run_id))
        if not fields:
            return None
        try:
            return RunRecord.from_fields(cast(dict[str, str], fields))
        except ValueError:
            logger.warning("unreadable run record", extra={"id": run_id})
            return None

    async def read_events(self, run_id: str, after: str, wait_s: float) -> Events:
        # A bounded block, well within the socket timeout, so a read never hangs a follower.
        block = min(wait_s, self.settings.redis_timeout_s / 2)
        with _reachable():
            answer = await self.redis.xread(
                {self.keys.events(run_id): "0-0" if after == "0" else after},
                count=_READ_BATCH,
                block=_ms(block) if block > 0 else None,
            )
        streams = cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], answer or [])
        return [(entry_id, entry["e"]) for _, entries in streams for entry_id, entry in entries]

    async def request_cancel(self, run_id: str) -> None:
        with _reachable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancel(run_id), "1", px=_ms(self.running_ttl_s))
                pipe.publish(self.keys.cancels(), run_id)
                await pipe.execute()


def run_store_for(settings: ServeSettings) -> RunStore:
    """Redis when RLM_SERVE_REDIS_URL is set, else this process's memory."""
    if settings.redis_url is None:
        return MemoryRunStore(settings)
    return RedisRunStore(settings, settings.redis_url.get_secret_value())
