"""The sessions of one runtime replica: create, execute, hibernate, restore, replace, reap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.runtime_models import (
    Context,
    CreateSession,
    ExecutionResult,
    VarInfo,
)
from sandbox_runtime.errors import SandboxError, SandboxGuestError
from sandbox_runtime.service.bridge import make_bridge
from sandbox_runtime.service.execution import execute_bounded
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.pool import WarmPool, quiet_kill
from sandbox_runtime.service.session import Session
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.service.store import HibernationRefused, HibernationStore
from sandbox_runtime.worker import SandboxProcess

logger = logging.getLogger(__name__)


class SessionManager:
    """Owns every session of this replica and the processes they hold."""

    def __init__(
        self,
        settings: RuntimeSettings,
        pool: WarmPool,
        store: HibernationStore,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._store = store
        self._metrics = metrics
        self._sessions: dict[str, Session] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.restarts = 0

    # --- counts ---------------------------------------------------------------------------

    @property
    def live(self) -> int:
        return sum(1 for s in self._sessions.values() if s.process is not None)

    @property
    def hibernated(self) -> int:
        return sum(1 for s in self._sessions.values() if s.hibernated)

    @property
    def busy(self) -> int:
        return sum(1 for s in self._sessions.values() if s.busy)

    def __len__(self) -> int:
        return len(self._sessions)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop(), name="session-reaper")

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for running executions to finish."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                for session in list(self._sessions.values()):
                    async with session.lock:
                        pass

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(self._end(s, "shutdown") for s in list(self._sessions.values())))

    # --- the API's operations ---------------------------------------------------------------

    async def create(self, body: CreateSession) -> Session:
        """A new session on a sandbox from the warm pool."""
        if len(self._sessions) >= self._settings.max_sessions:
            raise ApiError(
                429, ErrorCode.TOO_MANY_SESSIONS, f"{self._settings.max_sessions} sessions are open"
            )
        limits = self._settings.limits(body.limits, memory_bytes=self._pool.memory_bytes)
        process = await self._pool.acquire(limits.memory_bytes)
        session = Session(
            id=secrets.token_urlsafe(16),
            limits=limits,
            bridge=make_bridge(body.broker, self._settings, self._metrics),
            setup_code=body.setup_code,
            state=body.state,
            process=process,
        )
        try:
            await self._prepare(session, process)
        except BaseException:
            await quiet_kill(process)
            await session.bridge.aclose()
            raise
        if session.state is not None or session.setup_code:
            self._pool.memory.changed(process)
        self._sessions[session.id] = session
        self._metrics.sessions_created.inc()
        logger.info("session created", extra={"session_id": session.id, "pid": process.pid})
        await self._enforce_live_cap()
        return session

    async def execute(self, session_id: str, code: str, timeout_s: float | None) -> ExecutionResult:
        """Run `code` in the session, restoring or replacing its sandbox first if needed."""
        session = self._get(session_id)
        async with session.lock:
            self._check_open(session)
            session.touch()
            process = await self._live_process(session)
            started = time.perf_counter()
            result = await execute_bounded(
                process,
                code,
                timeout_s=timeout_s or session.limits.timeout_s,
                output_bytes=session.limits.output_bytes,
            )
            # The host counts the run's sub-calls from here (each request id once).
            result = result.model_copy(update={"sub_calls": session.bridge.take_sub_calls()})
            session.executions += 1
            session.touch()
            self._pool.memory.changed(process)  # read again at the next reaper tick
            if not process.alive or result.state_lost:
                await self._lost_process(session, process)
            if session.state_lost and not result.state_lost:
                result = result.model_copy(update={"state_lost": True})
            session.state_lost = False
            if result.state is not None:
                session.state = result.state
            self._metrics.observe_execution(result, time.perf_counter() - started)
            return result

    async def load_context(self, session_id: str, context: Context, index: int = 0) -> None:
        session = self._get(session_id)
        async with session.lock:
            self._check_open(session)
            session.touch()
            process = await self._live_process(session)
            try:
                await process.set_context(context, index)
            except SandboxError as exc:
                raise await self._control_failed(
                    session, process, "loading the context", exc
                ) from exc
            self._pool.memory.changed(process)

    async def list_vars(self, session_id: str) -> list[VarInfo]:
        session = self._get(session_id)
        async with session.lock:
            self._check_open(session)
            session.touch()
            process = await self._live_process(session)
            try:
                return await process.list_vars()
            except SandboxError as exc:
                raise await self._control_failed(
                    session, process, "listing variables", exc
                ) from exc

    async def delete(self, session_id: str) -> None:
        await self._end(self._get(session_id), "deleted")

    async def hibernate(self, session_id: str) -> bool:
        """Hibernate the session now (if live and idle); True if it was hibernated."""
        session = self._get(session_id)
        if session.busy:
            return False
        async with session.lock:
            return await self._hibernate_locked(session)

    def info(self, session_id: str) -> dict[str, Any]:
        session = self._get(session_id)
        return {
            "session_id": session.id,
            "status": "busy" if session.busy else "hibernated" if session.hibernated else "live",
            "pid": session.process.pid if session.process is not None else None,
            "executions": session.executions,
            "idle_s": round(session.idle_for(), 3),
        }

    # --- processes ----------------------------------------------------------------------------

    async def _prepare(self, session: Session, process: SandboxProcess) -> None:
        """Give a fresh process the session's bridge, state and setup code."""
        process.bridge = session.bridge
        if session.state is not None:
            try:
                await process.set_state(session.state)
            except SandboxGuestError as exc:
                raise ApiError(400, exc.type, f"the state was refused: {exc.message}") from exc
            except SandboxError as exc:
                raise ApiError(
                    503, ErrorCode.UNAVAILABLE, f"the sandbox failed while setting the state: {exc}"
                ) from exc
        if session.setup_code:
            result = await execute_bounded(
                process,
                session.setup_code,
                timeout_s=session.limits.timeout_s,
                output_bytes=session.limits.output_bytes,
            )
            if result.error is not None:
                raise ApiError(
                    400,
                    "setup_failed",
                    f"setup_code failed: {result.error.type}: {result.error.message}",
                )

    async def _live_process(self, session: Session) -> SandboxProcess:
        """The session's running process: restored from hibernation or replaced if dead."""
        process = session.process
        if process is not None and process.alive:
            return process
        if process is not None:
            await self._lost_process(session, process)
        blob = await self._store.get(session.id) if session.has_blob else None
        if blob is not None:
            started = time.perf_counter()
            process = await self._pool.restore(blob, session.limits.memory_bytes)
            process.bridge = session.bridge
            self._metrics.restores.inc()
            logger.info(
                "session restored",
                extra={
                    "session_id": session.id,
                    "pid": process.pid,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
        else:
            process = await self._pool.acquire(session.limits.memory_bytes)
            await self._prepare(session, process)
            logger.info("session re-created", extra={"session_id": session.id, "pid": process.pid})
        session.process = process
        await self._enforce_live_cap(keep=session)
        return process

    async def _control_failed(
        self, session: Session, process: SandboxProcess, doing: str, exc: SandboxError
    ) -> ApiError:
        """The error to answer with when a control request failed; a dead process is replaced."""
        if isinstance(exc, SandboxGuestError) and process.alive:
            return ApiError(400, exc.type, f"the sandbox refused {doing}: {exc.message}")
        if not process.alive:
            await self._lost_process(session, process)
        return ApiError(503, ErrorCode.UNAVAILABLE, f"the sandbox failed while {doing}: {exc}")

    async def _lost_process(self, session: Session, process: SandboxProcess) -> None:
        """The session's process died (or failed): end it and mark the session."""
        await quiet_kill(process)
        if session.process is process:
            session.process = None
        session.state_lost = True
        self.restarts += 1
        self._metrics.restarts.inc()
        logger.warning("sandbox lost", extra={"session_id": session.id, "pid": process.pid})

    async def _hibernate_locked(self, session: Session, reason: str = "idle") -> bool:
        process = session.process
        if process is None or session.closed:
            return False
        if not process.alive:
            await self._lost_process(session, process)
            return False
        started = time.perf_counter()
        try:
            blob = await process.snapshot_namespace()
            # Stored while the process still runs: a blob the store refuses (over a size or
            # budget) leaves the session live, its variables intact.
            await self._store.put(session.id, blob)
        except (SandboxError, HibernationRefused) as exc:
            logger.warning(
                "hibernation failed", extra={"session_id": session.id, "error": str(exc)}
            )
            if not process.alive:  # else the session simply stays live
                await self._lost_process(session, process)
            return False
        session.has_blob = True
        session.process = None
        await process.aclose()
        if reason != "memory":  # hibernated to make room: that room is not the pool's
            self._pool.wake(freed=True)
        self._metrics.hibernations.inc()
        logger.info(
            "session hibernated",
            extra={
                "session_id": session.id,
                "reason": reason,
                "bytes": len(blob),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return True

    async def _end(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        # Kill first (outside the lock) so a running execution stops now, not at its timeout.
        if session.process is not None:
            await quiet_kill(session.process)
        async with session.lock:
            session.process = None
        self._pool.wake(freed=True)  # its memory is free: the pool may refill
        await self._store.delete(session.id)
        await session.bridge.aclose()
        self._metrics.sessions_ended.labels(reason=reason).inc()
        logger.info("session ended", extra={"session_id": session.id, "reason": reason})

    # --- idle sessions -------------------------------------------------------------------------

    async def reap_once(self) -> None:
        """End sessions idle past their TTL; hibernate live ones idle past `hibernate_after_s`;
        then measure the sandboxes and bring them within the memory budget."""
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if session.busy:
                continue
            if session.idle_for(now) >= session.limits.idle_ttl_s:
                await self._end(session, "idle_ttl")
            elif (
                self._settings.hibernate_after_s > 0
                and session.process is not None
                and session.idle_for(now) >= self._settings.hibernate_after_s
            ):
                async with session.lock:
                    await self._hibernate_locked(session)
        await self._fit_memory()

    async def reclaim(self, enough: Callable[[], bool]) -> None:
        """Hibernate least recently used idle sessions until `enough()` (the pool's hook for
        a start-up that does not fit in the memory budget)."""
        await self._hibernate_lru(enough, reason="memory")

    async def _fit_memory(self) -> None:
        """Measure the sandboxes; above the budget, end warm sandboxes, then hibernate least
        recently used idle sessions, until under it. The pool refills if there is room.

        The warm pool goes first: it holds no one's state (losing a warm sandbox costs a later
        start-up; hibernating a session costs its next call a restore), and it is what grew
        into the room a session then needed (sessions grow as they run, the pool refills
        whenever one more sandbox fits)."""
        memory = self._pool.memory
        await memory.measure()

        def within() -> bool:
            return memory.total <= memory.budget.bytes

        if not within():
            await self._pool.shrink()
        await self._hibernate_lru(within, reason="memory")
        if not within():
            logger.warning(
                "sandboxes above the memory budget; none idle to hibernate",
                extra={"bytes": memory.total, "budget": memory.budget.bytes},
            )
        self._pool.wake()

    async def _enforce_live_cap(self, keep: Session | None = None) -> None:
        """Hibernate the least recently used idle sessions beyond `max_live_sessions`."""
        await self._hibernate_lru(
            lambda: self.live <= self._settings.max_live_sessions, keep=keep, reason="live_cap"
        )

    async def _hibernate_lru(
        self, enough: Callable[[], bool], *, reason: str, keep: Session | None = None
    ) -> None:
        """Hibernate live idle sessions, least recently used first, until `enough()`.

        A session executing is never chosen: `busy` is checked right before its lock is
        taken, with no await between, so this never waits behind an execution.
        """
        if enough():
            return
        idle = sorted(
            (s for s in self._sessions.values() if s.process is not None and s is not keep),
            key=lambda s: s.last_used,
        )
        for session in idle:
            if enough():
                return
            if session.busy or session.process is None:
                continue
            async with session.lock:
                done = await self._hibernate_locked(session, reason)
            if done and reason == "memory":
                self._metrics.memory_hibernations.inc()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reaper_interval_s)
            try:
                await self.reap_once()
            except Exception:
                logger.exception("reaping idle sessions failed")

    # --- helpers -----------------------------------------------------------------------------

    def _get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no session {session_id!r}")
        return session

    @staticmethod
    def _check_open(session: Session) -> None:
        if session.closed:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"session {session.id!r} was ended")
