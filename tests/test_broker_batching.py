"""`TickBatcher`: the calls of one event-loop tick under one key run as one batch."""

from __future__ import annotations

import asyncio

import pytest

from broker.batching import TickBatcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch runner that records every batch and answers each call with its double."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.fail_on = fail_on

    async def run(self, key: str, calls: list[int]) -> list[int]:
        self.batches.append((key, list(calls)))
        await asyncio.sleep(0)
        if self.fail_on in calls:
            raise ConnectionError("redis went away")
        return [2 * call for call in calls]


async def test_calls_of_one_tick_share_a_batch_per_key_and_keep_their_order() -> None:
    recorder = Recorder()
    batcher = TickBatcher(recorder.run, max_calls=10, max_weight=100)
    results = await asyncio.gather(
        batcher.submit("a", 1), batcher.submit("b", 2), batcher.submit("a", 3)
    )
    assert list(results) == [2, 4, 6]
    assert sorted(recorder.batches) == [("a", [1, 3]), ("b", [2])]
    # A later tick opens a new batch.
    assert await batcher.submit("a", 4) == 8
    assert recorder.batches[-1] == ("a", [4])


async def test_a_batch_closes_at_its_call_or_weight_limit() -> None:
    recorder = Recorder()
    batcher = TickBatcher(recorder.run, max_calls=2, max_weight=10)
    await asyncio.gather(*(batcher.submit("a", n) for n in range(5)))
    assert [calls for _, calls in recorder.batches] == [[0, 1], [2, 3], [4]]
    recorder.batches.clear()
    await asyncio.gather(batcher.submit("a", 1, 6), batcher.submit("a", 2, 6))
    assert [calls for _, calls in recorder.batches] == [[1], [2]]
    recorder.batches.clear()
    assert await batcher.submit("a", 7, 50) == 14  # heavier than a batch: runs alone


async def test_a_failed_batch_fails_each_of_its_callers_and_no_other() -> None:
    recorder = Recorder(fail_on=2)
    batcher = TickBatcher(recorder.run, max_calls=10, max_weight=100)
    outcomes = await asyncio.gather(
        batcher.submit("a", 1), batcher.submit("a", 2), batcher.submit("b", 3),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(outcomes[0], ConnectionError)
    assert isinstance(outcomes[1], ConnectionError)
    assert outcomes[2] == 6


async def test_a_caller_that_leaves_does_not_stop_its_batch() -> None:
    recorder = Recorder()
    batcher = TickBatcher(recorder.run, max_calls=10, max_weight=100)
    leaving = asyncio.create_task(batcher.submit("a", 1))
    staying = asyncio.create_task(batcher.submit("a", 2))
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == 4
    assert recorder.batches == [("a", [1, 2])]


async def test_a_batch_starts_in_the_pass_after_its_first_call() -> None:
    """Calls of the same pass still join it; a lone call waits one pass, not two."""
    recorder = Recorder()
    batcher = TickBatcher(recorder.run, max_calls=10, max_weight=100)
    first = asyncio.ensure_future(batcher.submit("a", 1))
    await asyncio.sleep(0)  # this pass: the call opens the batch
    second = asyncio.ensure_future(batcher.submit("a", 2))  # a pass later: too late to join
    await asyncio.sleep(0)  # the next pass: the batch runs
    assert recorder.batches == [("a", [1])]
    assert (await first, await second) == (2, 4)
    assert recorder.batches == [("a", [1]), ("a", [2])]
