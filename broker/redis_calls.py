"""The hot path's Redis calls: a pool whose get and release are cheap, and commands sent
straight on one of its connections.

redis-py's machinery around each command was ~30 % of the broker's CPU at c=1 (py-spy,
issue 13): `BlockingConnectionPool.get_connection` behind a deprecated-arguments wrapper, a
condition, a timeout and observability records on every get and release; a retry wrapper;
a task (`asyncio.wait_for`) per socket write; and its pure-Python command packing (8x the
CPU of hiredis's `pack_command`, the same bytes for str, bytes, int and float arguments, in
UTF-8 as the broker's clients encode). Measured on one connection to a local valkey (CPU
per EVALSHA, syscalls included, best of 3 x 5,000, load 1.5): 182 us through redis-py's
`AsyncScript` and `BlockingConnectionPool`, 72 us here.

Guarantees kept: every read is bounded by the connection's `socket_timeout` (redis-py's own
`read_response`), a write that cannot complete at once by the same; a connection that fails
(an error, a timeout, a cancelled call) is disconnected and reconnected on its next use;
errors are redis-py's (`ConnectionError`, `TimeoutError`, `ResponseError` and its leaves);
no retry, as the broker's client had none (redis-py's connection default,
`Retry(NoBackoff(), 0)`): a failed call answers 503 and the caller retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT


class LeanPool(BlockingConnectionPool):
    """A `BlockingConnectionPool` that hands out an idle connection, and takes it back,
    without its condition, timeout or observability records, while nobody waits for one.

    When the pool is exhausted, callers queue as in `BlockingConnectionPool` (bounded by
    `timeout`, then `ConnectionError`), and while any does, every get and release takes
    the queue's path, so a waiter is never overtaken. Skipped on the fast path: the
    release event that re-authenticates connections of a streaming credential provider
    (the broker has none) and redis-py's connection-count metrics (OpenTelemetry, unused).
    """

    #: callers inside `BlockingConnectionPool.get_connection` (waiting for a connection)
    _queued = 0

    async def get_connection(
        self, command_name: object = None, *keys: object, **options: object
    ) -> AbstractConnection:
        available = self._available_connections
        if available and not self._queued and not self._in_maintenance:
            connection: AbstractConnection = available.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._queued += 1
        try:
            queued: AbstractConnection = await super().get_connection()  # type: ignore[no-untyped-call]
            return queued
        finally:
            self._queued -= 1

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        """Connected, with nothing unread: an idle connection with data or at its end (the
        server closed it: Redis restarted) is connected again. redis-py 8.1 skips this for
        every pool whose maintenance notifications are "auto" (its default, even on RESP2),
        so each connection left from before a Redis restart failed one call with a 503. The
        broker speaks RESP2, where nothing arrives unasked: unread data is never a reply."""
        if connection.is_connected:
            try:
                if not await connection.can_read():
                    return
            except (RedisConnectionError, OSError):
                pass  # `can_read` found it broken
            await connection.disconnect()
        await connection.connect()  # type: ignore[no-untyped-call]

    async def release(self, connection: AbstractConnection) -> None:
        if self._queued or self._in_maintenance:
            await super().release(connection)  # wakes a waiter under the pool's condition
            return
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
        self._available_connections.append(connection)


async def execute(pool: ConnectionPool, *args: EncodableT) -> Any:
    """One command on a pooled connection: its reply (an error reply is raised)."""
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await _send(connection, [_pack(args)])
        return await connection.read_response()
    except (RedisConnectionError, RedisTimeoutError):
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def execute_many(pool: ConnectionPool, commands: Sequence[Sequence[EncodableT]]) -> list[Any]:
    """Several commands in one write on one pooled connection: a reply for each, in order;
    a command that Redis refused has its `ResponseError` as its reply (as a pipeline's
    `execute(raise_on_error=False)`), not raised."""
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await _send(connection, [_pack(command) for command in commands])
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:  # the connection is fine: read the next reply
                replies.append(exc)
        return replies
    except (RedisConnectionError, RedisTimeoutError):
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


def _pack(args: Sequence[EncodableT]) -> bytes:
    """One command in the Redis protocol (hiredis; its stub types a 1-tuple)."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


async def _send(connection: AbstractConnection, packed: list[bytes]) -> None:
    """Write `packed`; wait (within `socket_timeout`) only when the socket did not take it
    all at once. redis-py's `send_packed_command` runs every write as a task under
    `asyncio.wait_for` (~25 us of CPU per command here); this reaches for its stream writer,
    a private attribute of the pinned redis-py (tests/test_broker_redis_calls.py)."""
    if connection.health_check_interval:
        await connection.check_health()  # type: ignore[no-untyped-call]
    writer: asyncio.StreamWriter | None = getattr(connection, "_writer", None)
    if writer is None or not connection.is_connected:
        await connection.send_packed_command(packed, check_health=False)  # connects it
        return
    try:
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(connection.socket_timeout):
                await writer.drain()
    except TimeoutError:  # before OSError: a subclass of it
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        # A write cut short (cancelled) leaves the stream mid-command: never reuse it.
        await connection.disconnect(nowait=True)
        raise
