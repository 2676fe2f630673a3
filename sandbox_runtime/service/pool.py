"""The warm pool: sandboxes started ahead of demand from the memory snapshot.

Every start-up (pool refill, a dedicated sandbox with its own memory bound) runs under one
semaphore sized to the core count: start-up is CPU-bound, and more at once only makes each
slower. A caller waiting for a sandbox adds to the refill target, so waiters and refills share
one queue and none starts a process of its own. A restore (a hibernated session, a stateless
call with a snapshot) loads its blob into a sandbox from the pool instead of starting one.

Every sandbox started here is counted in `memory` (its PSS is read once it is up). The pool
refills only while one more sandbox fits in the memory budget, so its size is a ceiling the
budget can lower; a caller that needs a start-up first gets room from `reclaim` (the session
manager hibernates idle sessions), else 503 `sandbox_memory_exhausted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from sandbox_runtime.errors import SandboxBlobError, SandboxError, SandboxGuestError
from sandbox_runtime.service.memory import MemoryBudget, SandboxMemory
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.worker import SandboxProcess, WorkerSettings

logger = logging.getLogger(__name__)

#: Pause after a failed start-up, so a broken installation does not spin.
_FAILURE_BACKOFF_S = 1.0
#: After warm sandboxes were ended for memory, the pool does not refill for this long unless a
#: session frees memory first: sessions that grew into the room would otherwise have the pool
#: start a sandbox (1-1.5 s of CPU) and end it again at every reaper tick.
REFILL_HOLD_S = 30.0

#: Frees memory until the condition holds (or nothing more can be freed); see `WarmPool.reclaim`.
Reclaim = Callable[[Callable[[], bool]], Awaitable[None]]


class WarmPool:
    """Pre-started `SandboxProcess`es with the default memory bound, refilled in the background."""

    def __init__(
        self,
        worker_settings: WorkerSettings,
        *,
        size: int,
        max_concurrent_spawns: int,
        memory_bytes: int,
        metrics: Metrics,
        acquire_timeout_s: float = 60.0,
        memory: SandboxMemory | None = None,
    ) -> None:
        self._worker_settings = worker_settings
        self.size = size
        self.memory_bytes = memory_bytes
        self._metrics = metrics
        self._acquire_timeout_s = acquire_timeout_s
        self._spawn_slots = asyncio.Semaphore(max_concurrent_spawns)
        self._ready: asyncio.Queue[SandboxProcess] = asyncio.Queue()
        self._waiters = 0
        self._spawning = 0
        self._wake = asyncio.Event()
        self._filled = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        self._spawn_tasks: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        self.memory = memory or SandboxMemory(MemoryBudget.unlimited())
        #: Set by the session manager: hibernates idle sessions until the condition holds.
        self.reclaim: Reclaim | None = None
        #: Start-ups outside the pool (another memory bound) in flight.
        self._own_spawns = 0
        #: Callers making room for a start-up: the pool's own refill waits meanwhile, so it
        #: does not take the memory they free.
        self._admitting = 0
        #: No refill before this (monotonic time): see REFILL_HOLD_S.
        self._hold_until = 0.0

    @property
    def idle(self) -> int:
        """Ready sandboxes waiting in the pool."""
        return self._ready.qsize()

    @property
    def spawning(self) -> int:
        return self._spawning

    @property
    def target(self) -> int:
        """Warm sandboxes the pool aims at now: its size, or fewer while the budget is short
        (or while it holds back after a shrink)."""
        if self._held():
            return min(self.size, self.idle)
        return max(0, min(self.size, self.idle + self.memory.room() - self._own_spawns))

    def wake(self, *, freed: bool = False) -> None:
        """Look again whether the pool can refill; `freed`: a session gave its memory back
        (ended, hibernated), which lifts a hold after a shrink."""
        if freed:
            self._hold_until = 0.0
        self._wake.set()

    def _held(self) -> bool:
        return time.monotonic() < self._hold_until

    async def shrink(self) -> int:
        """End warm sandboxes while the live ones hold more than the budget; how many."""
        ended = 0
        while not self._ready.empty() and self.memory.total > self.memory.budget.bytes:
            await quiet_kill(self._ready.get_nowait())
            ended += 1
        if ended:
            self._hold_until = time.monotonic() + REFILL_HOLD_S
            logger.info("warm pool shrunk to the memory budget", extra={"ended": ended})
        return ended

    def start(self) -> None:
        """Start the refill task; it fills the pool at once."""
        self._refill_task = asyncio.create_task(self._refill_loop(), name="pool-refill")
        self._wake.set()

    async def wait_ready(self, count: int | None = None, timeout_s: float = 60.0) -> None:
        """Wait until `count` (default: the pool size) sandboxes are ready; for start-up/tests."""
        want = self.size if count is None else count
        async with asyncio.timeout(timeout_s):
            while self._ready.qsize() < want:
                self._filled.clear()
                await self._filled.wait()

    async def acquire(self, memory_bytes: int | None = None) -> SandboxProcess:
        """A started sandbox, owned by the caller from now on (it must kill or close it).

        Taking one from the pool wakes the refill (no caller needs to ask for it). A caller
        that needs a start-up (none ready or starting for it) must fit in the memory budget:
        `reclaim` is asked to make room, else 503 `sandbox_memory_exhausted`.
        """
        if memory_bytes is not None and memory_bytes != self.memory_bytes:
            await self._admit()
            self._own_spawns += 1
            try:
                return await self.spawn(memory_bytes)
            finally:
                self._own_spawns -= 1
        if self._waiters >= self._ready.qsize() + self._spawning:
            await self._admit()
        self._waiters += 1
        self._wake.set()
        try:
            async with asyncio.timeout(self._acquire_timeout_s):
                while True:
                    process = await self._ready.get()
                    if process.alive:
                        return process
                    await quiet_kill(process)
        except TimeoutError as exc:
            detail = f": {self.last_error}" if self.last_error else ""
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, f"no sandbox could be started{detail}"
            ) from exc
        finally:
            self._waiters -= 1
            self._wake.set()

    async def spawn(self, memory_bytes: int | None = None) -> SandboxProcess:
        """Start a sandbox outside the pool (e.g. with its own memory bound)."""
        async with self._spawn_slots:
            started = time.perf_counter()
            try:
                process = await SandboxProcess.spawn(
                    self._worker_settings, memory_bytes=memory_bytes or self.memory_bytes
                )
            except SandboxError as exc:
                raise ApiError(
                    503, ErrorCode.UNAVAILABLE, f"a sandbox could not be started: {exc}"
                ) from exc
            self._metrics.spawns.inc()
            self._metrics.spawn_seconds.observe(time.perf_counter() - started)
        try:
            await self.memory.read(process)  # ~10-15 ms in a thread, off the create path
        except BaseException:  # cancelled: the process must not outlive its handle
            await quiet_kill(process)
            raise
        return process

    def _fits_one_more(self) -> bool:
        """One more sandbox fits besides the live ones and the start-ups in flight."""
        return self.memory.fits(1 + self._spawning + self._own_spawns)

    async def _admit(self) -> None:
        """Room in the memory budget for one start-up, made by `reclaim` if need be."""
        # Decided on fresh readings: a session that just ran, or one whose neighbour just
        # ended, may hold far more than it was last read at (the reaper reads at its pace).
        await self.memory.measure()
        if self._fits_one_more():
            return
        if self.reclaim is not None:
            self._admitting += 1
            try:
                await self.reclaim(self._fits_one_more)
            finally:
                self._admitting -= 1
                self._wake.set()
            if self._fits_one_more():
                return
        self._metrics.memory_refusals.inc()
        budget = self.memory.budget
        raise ApiError(
            503,
            ErrorCode.SANDBOX_MEMORY_EXHAUSTED,
            f"no memory for another sandbox: the live ones hold {self.memory.total} bytes of "
            f"the {budget.bytes}-byte budget (RLM_SANDBOX_LIVE_MEMORY_BYTES, {budget.source}) "
            "and no idle session is left to hibernate; retry later",
            headers={"Retry-After": str(self.memory.retry_after_s)},
        )

    async def restore(self, blob: bytes, memory_bytes: int | None = None) -> SandboxProcess:
        """A sandbox holding the namespace of a hibernation (or stateless) blob.

        With the pool's memory bound the blob is loaded into a sandbox taken from the pool,
        so no start-up lies on the caller's path; with another bound one is started for it.
        A blob the sandbox cannot read raises `BadRequest` (code `bad_snapshot`).
        """
        process = await self.acquire(memory_bytes)
        try:
            await process.load_namespace(blob)
        except SandboxBlobError as exc:
            # Refused before anything reached the sandbox: it is still clean, keep it.
            if process.memory_limit == self.memory_bytes:
                self._give_back(process)
            else:
                await quiet_kill(process)
            raise ApiError(
                400, ErrorCode.BAD_SNAPSHOT, f"the snapshot cannot be restored: {exc}"
            ) from exc
        except SandboxGuestError as exc:
            await quiet_kill(process)
            raise ApiError(
                400, ErrorCode.BAD_SNAPSHOT, f"the snapshot cannot be restored: {exc}"
            ) from exc
        except SandboxError as exc:
            await quiet_kill(process)
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, f"a sandbox could not be restored: {exc}"
            ) from exc
        except BaseException:
            await quiet_kill(process)
            raise
        self.memory.changed(process)  # it holds the namespace now: read it again
        return process

    def _give_back(self, process: SandboxProcess) -> None:
        """Return an untouched sandbox (no bridge, no code run, no data loaded) to the pool.

        `acquire` kills it instead of handing it out if it died meanwhile.
        """
        self._ready.put_nowait(process)
        self._filled.set()

    async def aclose(self) -> None:
        """Stop refilling and end every pooled sandbox."""
        if self._refill_task is not None:
            self._refill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill_task
        # Start-ups in flight are awaited, not cancelled: a cancelled start-up could leave a
        # process behind that nobody kills.
        if self._spawn_tasks:
            _, late = await asyncio.wait(set(self._spawn_tasks), timeout=self._acquire_timeout_s)
            for task in late:
                task.cancel()
        while not self._ready.empty():
            await quiet_kill(self._ready.get_nowait())

    async def _refill_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            missing = self.size + self._waiters - self._ready.qsize() - self._spawning
            for _ in range(max(0, missing)):
                # A start-up a waiter needs was admitted already; the pool's own waits for
                # room in the memory budget (`wake` when memory is freed) and, after a
                # shrink, for a session to free some (or REFILL_HOLD_S).
                for_waiter = self._waiters > self._ready.qsize() + self._spawning
                if not for_waiter and (
                    self._admitting or self._held() or not self._fits_one_more()
                ):
                    break
                self._spawning += 1
                task = asyncio.create_task(self._spawn_one(), name="pool-spawn")
                self._spawn_tasks.add(task)
                task.add_done_callback(self._spawn_tasks.discard)

    async def _spawn_one(self) -> None:
        try:
            process = await self.spawn()
        except ApiError as exc:
            self.last_error = str(exc)
            logger.error("sandbox start-up failed", extra={"error": str(exc)})
            await asyncio.sleep(_FAILURE_BACKOFF_S)
            return
        finally:
            self._spawning -= 1
            self._wake.set()
        self.last_error = None
        self._ready.put_nowait(process)
        self._filled.set()


async def quiet_kill(process: SandboxProcess) -> None:
    """Kill `process`, logging (not raising) a failure: used on paths that are already ending."""
    try:
        await process.kill()
    except (SandboxError, OSError):
        logger.exception("killing a sandbox failed", extra={"pid": process.pid})
