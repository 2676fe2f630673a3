"""The warm pool restores namespace blobs into sandboxes it already started."""

from __future__ import annotations

import pytest

from rlm_wire.errors import ApiError
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.pool import WarmPool
from tests.sandbox_worker_helpers import SETTINGS, child_pids, ok

pytestmark = pytest.mark.anyio


async def test_restore_loads_the_blob_into_a_pooled_sandbox() -> None:
    pool = WarmPool(
        SETTINGS,
        size=1,
        max_concurrent_spawns=1,
        memory_bytes=SETTINGS.memory_bytes,
        metrics=Metrics(),
    )
    pool.start()
    try:
        source = await pool.acquire()
        await ok(source, "x = 41\ndef inc(n): return n + 1")
        saved = await source.snapshot_namespace()
        await source.kill()
        await pool.wait_ready(1)
        warm = child_pids()

        # A blob refused before it reached the sandbox leaves the sandbox in the pool.
        with pytest.raises(ApiError) as refused:
            await pool.restore(b"junk")
        assert refused.value.code == "bad_snapshot"
        assert pool.idle >= 1

        restored = await pool.restore(saved)
        try:
            assert restored.pid in warm  # no start-up on the restore's path
            assert await ok(restored, "print(inc(x))") == "42\n"
        finally:
            await restored.kill()

        # Another memory bound than the pool's: a sandbox started for it.
        small = SETTINGS.memory_bytes // 2
        own = await pool.restore(saved, memory_bytes=small)
        try:
            assert own.pid not in warm
            assert own.memory_limit == small
            assert await ok(own, "print(x)") == "41\n"
        finally:
            await own.kill()
    finally:
        await pool.aclose()
