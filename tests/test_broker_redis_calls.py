"""`broker.redis_calls`: the lean pool and the commands sent straight on its connections,
against a real Redis: replies, error replies, broken and cancelled calls, an exhausted pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.redis_calls import LeanPool, execute, execute_many
from broker.redis_server import RedisServer
from broker.scripts import Script

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[LeanPool]:
    pool = LeanPool.from_url(
        redis_url, max_connections=2, timeout=0.5, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        yield pool
    finally:
        await pool.aclose()


async def _client_ids(redis_url: str) -> list[str]:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        clients = await admin.client_list()
        own = await admin.client_id()
    finally:
        await admin.aclose()
    return [str(c["id"]) for c in clients if int(c["id"]) != own]


async def _kill_the_pools_connection(redis_url: str) -> None:
    """The server closes the one connection the pool holds (as a Redis restart would)."""
    (victim,) = await _client_ids(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.client_kill_filter(_id=victim)
    finally:
        await admin.aclose()


async def test_replies_come_back_in_order_and_an_error_reply_is_only_its_own(
    pool: LeanPool,
) -> None:
    assert await execute(pool, "SET", "k", "v") == b"OK"
    assert await execute(pool, "GET", "k") == b"v"
    replies = await execute_many(
        pool, [["INCR", "n"], ["INCR", "k"], ["INCRBYFLOAT", "n", 1.5], ["GET", "k"]]
    )
    assert replies[0] == 1
    assert isinstance(replies[1], ResponseError)  # "k" is not an integer
    assert replies[2:] == [b"2.5", b"v"]
    with pytest.raises(ResponseError):
        await execute(pool, "INCR", "k")
    # An error reply leaves the connection usable: the next call gets its own reply.
    assert await execute(pool, "GET", "k") == b"v"
    assert len(pool._in_use_connections) == 0


async def test_a_large_command_is_written_whole(pool: LeanPool) -> None:
    big = b"x" * (8 * 2**20)  # far more than a socket takes at once: the drain path
    assert await execute(pool, "SET", "big", big) == b"OK"
    assert await execute(pool, "STRLEN", "big") == len(big)


async def test_a_connection_cut_under_a_call_fails_it_once_and_the_next_reconnects(
    pool: LeanPool, redis_url: str
) -> None:
    call = asyncio.ensure_future(execute(pool, "BLPOP", "q", 5))
    await asyncio.sleep(0.1)  # sent; Redis holds it
    await _kill_the_pools_connection(redis_url)
    # No retry (as the broker's client before): the call fails, its caller answers 503.
    with pytest.raises(RedisConnectionError):
        await call
    assert await execute(pool, "SET", "k", "again") == b"OK"
    assert await execute(pool, "GET", "k") == b"again"


async def test_an_idle_connection_the_server_closed_is_connected_again(
    pool: LeanPool, redis_url: str
) -> None:
    assert await execute(pool, "PING") == b"PONG"
    await _kill_the_pools_connection(redis_url)
    assert await execute(pool, "ECHO", "fresh") == b"fresh"


async def test_a_cancelled_call_never_leaves_its_reply_to_the_next(
    pool: LeanPool, redis_url: str
) -> None:
    call = asyncio.ensure_future(execute(pool, "BLPOP", "q", 5))
    await asyncio.sleep(0.1)  # sent; Redis holds it until "q" has an item
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _push(redis_url, "q", "stale")
    # The same (only idle) connection must not hand the late "stale" to this call, and
    # the abandoned BLPOP took nothing (its connection was closed).
    assert await execute(pool, "ECHO", "fresh") == b"fresh"
    assert await execute(pool, "LLEN", "q") == 1


async def test_a_reply_later_than_the_timeout_fails_and_is_not_read_by_the_next_call(
    redis_url: str,
) -> None:
    pool = LeanPool.from_url(
        redis_url, max_connections=1, timeout=2, socket_timeout=0.2, socket_connect_timeout=2
    )
    try:
        with pytest.raises(RedisTimeoutError):
            await execute(pool, "BLPOP", "q", 5)
        await _push(redis_url, "q", "late")
        assert await execute(pool, "ECHO", "fresh") == b"fresh"
        assert await execute(pool, "LLEN", "q") == 1
    finally:
        await pool.aclose()


async def _push(redis_url: str, key: str, value: str) -> None:
    other = aioredis.Redis.from_url(redis_url)
    try:
        await other.rpush(key, value)
    finally:
        await other.aclose()


async def test_an_exhausted_pool_queues_callers_in_turn_then_times_out(pool: LeanPool) -> None:
    held = [await pool.get_connection(), await pool.get_connection()]  # max_connections=2
    queued = asyncio.ensure_future(execute(pool, "ECHO", "queued"))
    await asyncio.sleep(0.05)
    assert not queued.done()
    await pool.release(held.pop())
    assert await queued == b"queued"  # handed the released connection
    # One connection left idle, one held: a caller takes the idle one at once.
    assert await execute(pool, "ECHO", "idle") == b"idle"
    second = await pool.get_connection()
    with pytest.raises(RedisConnectionError, match="No connection available"):
        await execute(pool, "ECHO", "none")  # waits `timeout` (0.5 s), then gives up
    for connection in (held.pop(), second):
        await pool.release(connection)
    assert await execute(pool, "ECHO", "after") == b"after"


async def test_a_script_redis_forgot_is_loaded_and_run_once(pool: LeanPool) -> None:
    script = Script("return ARGV[1] .. redis.call('INCR', KEYS[1])", pool)
    assert await script(["n"], ["a"]) == b"a1"  # never loaded: NOSCRIPT, load, run
    await execute(pool, "SCRIPT", "FLUSH")
    replies = await script.run_many(
        [script.command(["n"], ["b"]), ["INCR", "other"], script.command(["n"], ["c"])]
    )
    # Each call ran exactly once (the NOSCRIPT ones ran nothing the first time).
    assert replies == [b"b2", 1, b"c3"]
    assert await execute(pool, "GET", "n") == b"3"
    assert not any(isinstance(r, NoScriptError) for r in replies)


async def test_idle_connections_from_before_a_redis_restart_are_connected_again() -> None:
    with RedisServer() as server:
        pool = LeanPool.from_url(
            server.url, max_connections=3, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            held = [await pool.get_connection() for _ in range(3)]
            for connection in held:
                await pool.release(connection)
            server.stop()
            server.start()  # same port; each idle connection was closed by the old server
            await asyncio.sleep(0.05)  # the loop sees those closes (blocked in `start` above)
            # None of them is handed out as it is (redis-py 8.1's pool did: one error each).
            assert [await execute(pool, "ECHO", str(i)) for i in range(4)] == [
                b"0",
                b"1",
                b"2",
                b"3",
            ]
        finally:
            await pool.aclose()
