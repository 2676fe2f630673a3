"""The one Redis subscription per broker replica that wakes every waiting HTTP call.

It listens on the work channel (new requests: wake `/pending`) and on this replica's reply
channel (answers: resolve `/enqueue` and `/requests` futures). It acts on no news this
replica made itself: the replica wakes its own long-polls when it enqueues (`enqueue.lua`
announces the work only while another replica listens, and the listener drops the echo of
an announcement by its origin), and resolves its own waiters when it takes an answer
(`answer.lua` publishes only to the other replicas). Pub/sub delivers at
most once, so after any reconnect it re-reads the durable results of everything still
waited on and wakes every poller (which also voids every "queue drained" mark of
`WorkSignals`).
"""

from __future__ import annotations

import asyncio
import logging
import random

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from broker.codec import text
from broker.keys import tenant_of_request
from broker.store import Store
from broker.waiters import Waiters, WorkSignals

logger = logging.getLogger(__name__)

_BACKOFF_INITIAL_S = 0.05
_BACKOFF_MAX_S = 2.0


class Listener:
    """Runs `run()` as a task for the life of the app; `ready` is set once subscribed."""

    def __init__(self, store: Store, waiters: Waiters, signals: WorkSignals) -> None:
        self._store = store
        self._waiters = waiters
        self._signals = signals
        self._work_channel = store.keys.work_channel().encode()
        self._reply_channel = store.keys.reply_channel(store.replica_id).encode()
        self._replica_id = store.replica_id
        self.ready = asyncio.Event()
        self.connected = False

    async def run(self) -> None:
        backoff = _BACKOFF_INITIAL_S
        outage_logged = False
        while True:
            pubsub = self._store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._work_channel, self._reply_channel)
                self.connected = True
                if outage_logged:
                    logger.info("redis subscription restored")
                    outage_logged = False
                await self._catch_up()
                self.ready.set()
                backoff = _BACKOFF_INITIAL_S
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                self.connected = False
                if not outage_logged:
                    logger.warning(
                        "redis subscription lost", extra={"error": f"{type(exc).__name__}: {exc}"}
                    )
                    outage_logged = True
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            finally:
                await _close_quietly(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            channel, data = message["channel"], message["data"]
            if channel == self._reply_channel:
                request_id, _, result = data.partition(b"\n")
                self._waiters.resolve(text(request_id), result)
            elif channel == self._work_channel:
                tenant_id, count, *origin = text(data).split(" ")
                if origin != [self._replica_id]:  # this replica woke its own pollers already
                    self._signals.notify(tenant_id, int(count))

    async def _catch_up(self) -> None:
        """Resolve waiters whose answer came while unsubscribed; wake all pollers."""
        self._signals.notify_all()
        ids = self._waiters.ids()
        refs = [(tenant, rid) for rid in ids if (tenant := tenant_of_request(rid)) is not None]
        if not refs:
            return
        results = await self._store.read_many(refs)
        for (_, request_id), result in zip(refs, results, strict=True):
            if result is not None:
                self._waiters.resolve(request_id, result)


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        logger.debug("closing a broken subscription failed", extra={"error": str(exc)})
