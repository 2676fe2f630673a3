"""The parts of one runtime replica, built together, started and stopped together."""

from __future__ import annotations

import logging
import time
from typing import Any

from sandbox_runtime.service.context_cache import ContextCache
from sandbox_runtime.service.layers import report_isolation
from sandbox_runtime.service.manager import SessionManager
from sandbox_runtime.service.memory import SandboxMemory, resolve_budget
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.pool import WarmPool
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.service.stateless import StatelessExecutor
from sandbox_runtime.service.store import HibernationStore, StoreLimits
from sandbox_runtime.worker import WorkerSettings, snapshot_memory
from sandbox_runtime.worker.page_merging import status as page_merging_status

logger = logging.getLogger(__name__)


class Runtime:
    """Warm pool, sessions, stateless executor and metrics of this replica."""

    def __init__(self, settings: RuntimeSettings, worker_settings: WorkerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Measured at the reaper's pace; "auto" is resolved here, once.
        self.memory = SandboxMemory(
            resolve_budget(settings.live_memory_bytes), interval_s=settings.reaper_interval_s
        )
        self.pool = WarmPool(
            worker_settings,
            size=settings.pool_size,
            max_concurrent_spawns=settings.max_concurrent_spawns,
            memory_bytes=worker_settings.memory_bytes,
            metrics=self.metrics,
            acquire_timeout_s=worker_settings.start_timeout_s,
            memory=self.memory,
        )
        self.store = HibernationStore(
            StoreLimits(
                max_blob_bytes=settings.hibernation_max_blob_bytes,
                memory_bytes=settings.hibernation_memory_bytes,
                disk_bytes=settings.hibernation_disk_bytes,
            ),
            settings.hibernation_dir or worker_settings.cache_dir / "hibernation",
        )
        self.sessions = SessionManager(settings, self.pool, self.store, self.metrics)
        # A start-up that does not fit in the memory budget hibernates idle sessions first.
        self.pool.reclaim = self.sessions.reclaim
        self.contexts = ContextCache(
            max_bytes=settings.context_cache_bytes,
            max_entries=settings.context_cache_entries,
            metrics=self.metrics,
        )
        self.stateless = StatelessExecutor(settings, self.pool, self.metrics, self.contexts)
        self.started_at = time.time()
        self.isolation = report_isolation(worker_settings)
        self._merge_pages = worker_settings.merge_pages
        self._register_gauges()

    def _register_gauges(self) -> None:
        gauge = self.metrics.gauge
        gauge("rlm_sandbox_pool_idle", "Ready sandboxes in the warm pool.", lambda: self.pool.idle)
        gauge("rlm_sandbox_pool_spawning", "Sandboxes starting.", lambda: self.pool.spawning)
        gauge(
            "rlm_sandbox_sessions_live", "Sessions holding a process.", lambda: self.sessions.live
        )
        gauge(
            "rlm_sandbox_sessions_hibernated",
            "Sessions hibernated to a blob.",
            lambda: self.sessions.hibernated,
        )
        gauge("rlm_sandbox_workers_busy", "Sandboxes executing code.", lambda: self.busy)
        gauge(
            "rlm_sandbox_hibernated_bytes",
            "Bytes of hibernation blobs held.",
            lambda: self.store.total_bytes,
        )
        gauge(
            "rlm_sandbox_memory_bytes",
            "Measured PSS of the live sandboxes (sessions, warm pool, stateless calls).",
            lambda: self.memory.total,
        )
        gauge(
            "rlm_sandbox_snapshot_file_bytes",
            "Memory of the snapshot file the runtime holds once for all sandboxes (they map it).",
            snapshot_memory.held_bytes,
        )
        gauge(
            "rlm_sandbox_memory_budget_bytes",
            "Memory the live sandboxes may hold (RLM_SANDBOX_LIVE_MEMORY_BYTES, or auto).",
            lambda: self.memory.budget.bytes,
        )
        gauge(
            "rlm_sandbox_memory_sandbox_estimate_bytes",
            "What one more sandbox is taken to cost: the median of recent readings.",
            lambda: self.memory.estimate,
        )
        gauge(
            "rlm_sandbox_pool_target",
            "Warm sandboxes the pool aims at: its size, or fewer while the budget is short.",
            lambda: self.pool.target,
        )

    @property
    def busy(self) -> int:
        return self.sessions.busy + self.stateless.running

    async def start(self) -> None:
        self.pool.start()
        self.sessions.start()
        budget = self.memory.budget
        logger.info(
            "sandbox runtime started",
            extra={
                "pool_size": self.pool.size,
                "max_sessions": self.settings.max_sessions,
                "memory_budget_bytes": budget.bytes,
                "memory_budget_source": budget.source,
                "memory_limit_bytes": budget.limit_bytes,
            },
        )

    async def aclose(self) -> None:
        """Let running executions finish (up to the grace period), then end everything."""
        await self.sessions.drain(self.settings.shutdown_grace_s)
        await self.sessions.aclose()
        await self.pool.aclose()
        await self.store.aclose()
        logger.info("sandbox runtime stopped")

    def health(self) -> dict[str, Any]:
        live = self.sessions.live
        busy_sessions = self.sessions.busy
        return {
            "status": "degraded" if self.pool.last_error else "ok",
            "uptime_s": round(time.time() - self.started_at, 3),
            "pool": {
                "size": self.pool.size,
                "target": self.pool.target,
                "idle": self.pool.idle,
                "spawning": self.pool.spawning,
                "last_error": self.pool.last_error,
            },
            "workers": {
                "busy": self.busy,
                "idle": self.pool.idle + max(0, live - busy_sessions),
            },
            "sessions": {
                "live": live,
                "hibernated": self.sessions.hibernated,
                "busy": busy_sessions,
                "max": self.settings.max_sessions,
                "hibernated_bytes": self.store.total_bytes,
                "hibernated_spilled_bytes": self.store.disk_bytes,
            },
            "memory": {
                **self.memory.as_dict(),
                "snapshot_file_bytes": snapshot_memory.held_bytes(),
            },
            "page_merging": page_merging_status(self._merge_pages).as_dict(),
            "stateless_running": self.stateless.running,
            "restarts": self.sessions.restarts,
            "isolation": self.isolation.as_dict(),
        }
