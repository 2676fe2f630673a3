"""Coalescing: calls made in one event-loop tick under one key run as one batch.

At high concurrency many `/enqueue` calls of one tenant reach the store in the same tick;
one Redis script for all of them costs the broker one command to build, send and parse
instead of one each. A lone call waits for nothing: its batch runs on the next tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

KeyT = TypeVar("KeyT", bound=Hashable)
CallT = TypeVar("CallT")
ResultT = TypeVar("ResultT")


class _Batch(Generic[CallT, ResultT]):
    __slots__ = ("calls", "futures", "weight")

    def __init__(self) -> None:
        self.calls: list[CallT] = []
        self.futures: list[asyncio.Future[ResultT]] = []
        self.weight = 0


class TickBatcher(Generic[KeyT, CallT, ResultT]):
    """`submit(key, call, weight)` joins the batch of `key` open in this tick (or opens
    one); `run(key, calls)` runs each batch and returns one result per call, in order. A
    batch closes at `max_calls` calls or `max_weight` (e.g. bytes); a call that fails the
    batch fails each of its callers with the same exception."""

    def __init__(
        self,
        run: Callable[[KeyT, list[CallT]], Awaitable[list[ResultT]]],
        *,
        max_calls: int,
        max_weight: int,
    ) -> None:
        self._run = run
        self._max_calls = max_calls
        self._max_weight = max_weight
        self._open: dict[KeyT, _Batch[CallT, ResultT]] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, key: KeyT, call: CallT, weight: int = 0) -> ResultT:
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is not None and (
            len(batch.calls) >= self._max_calls or batch.weight + weight > self._max_weight
        ):
            batch = None  # full: it runs as it is, this call opens the next one
        if batch is None:
            batch = self._open[key] = _Batch()
            # Its first step runs in the next pass of the loop: calls made in this one join.
            task = loop.create_task(self._execute(key, batch))
            self._running.add(task)  # a strong reference until it is done
            task.add_done_callback(self._running.discard)
        future: asyncio.Future[ResultT] = loop.create_future()
        batch.calls.append(call)
        batch.futures.append(future)
        batch.weight += weight
        return await future

    async def _execute(self, key: KeyT, batch: _Batch[CallT, ResultT]) -> None:
        if self._open.get(key) is batch:
            del self._open[key]  # closed: later calls open the next batch
        try:
            results = await self._run(key, batch.calls)
            if len(results) != len(batch.calls):
                raise RuntimeError(f"{len(results)} results for {len(batch.calls)} calls")
        except Exception as exc:  # noqa: BLE001 - not swallowed: each caller raises it
            for future in batch.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled with the loop: its callers go with it
            for future in batch.futures:
                future.cancel()
            raise
        for future, result in zip(batch.futures, results, strict=True):
            if not future.done():
                future.set_result(result)
