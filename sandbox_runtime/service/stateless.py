"""Stateless execution (`POST /execute`, the remote placement): nothing stays on the replica.

The namespace travels with the call: the request's base64 blob (if any) is restored into a
sandbox, the code runs, the namespace is snapshotted into the response, and the sandbox is
killed. Any replica can serve the next call.

Contexts do not travel: the call names them by content hash (`contexts`), this replica's
`ContextCache` holds their bytes (uploaded once by `PUT /contexts/{sha256}`), they are bound
before the code runs and left out of the returned blob. A hash the replica does not hold is
answered 409 `context_unknown` before any sandbox is taken. (The inline `context` field is
still served: it is loaded and kept in the blob, as before the cache.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time

from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.runtime_models import (
    ExecutionResult,
    StatelessExecuteRequest,
    StatelessExecuteResult,
)
from sandbox_runtime.errors import SandboxBlobError, SandboxError, SandboxGuestError
from sandbox_runtime.service.bridge import make_bridge
from sandbox_runtime.service.context_cache import CachedContext, ContextCache
from sandbox_runtime.service.execution import execute_bounded
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.pool import WarmPool, quiet_kill
from sandbox_runtime.service.settings import RuntimeSettings, SessionLimits
from sandbox_runtime.worker import SandboxProcess
from sandbox_runtime.worker import blob as blob_format


class StatelessExecutor:
    """Runs one `StatelessExecuteRequest` on a sandbox of its own."""

    def __init__(
        self, settings: RuntimeSettings, pool: WarmPool, metrics: Metrics, contexts: ContextCache
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._contexts = contexts
        self.running = 0

    async def execute(self, request: StatelessExecuteRequest) -> StatelessExecuteResult:
        """Restore (or take a fresh sandbox), run, snapshot, kill; the blob goes back."""
        limits = self._settings.limits(request.limits, memory_bytes=self._pool.memory_bytes)
        blob = _decode(request.snapshot) if request.snapshot else None
        if blob is not None:
            await self._check_snapshot(blob)
        refs = request.contexts or []
        # Held from here, so an eviction while the code runs cannot take them away.
        contents = self._contexts.resolve(ref.sha256 for ref in refs)
        self.running += 1
        started = time.perf_counter()
        bridge = make_bridge(request.broker, self._settings, self._metrics)
        try:
            if blob is not None:
                process = await self._pool.restore(blob, limits.memory_bytes)
            else:
                process = await self._pool.acquire(limits.memory_bytes)
            try:
                process.bridge = bridge
                await self._bind_contexts(process, request, contents, restored=blob is not None)
                result, snapshot = await self._run(process, request, limits)
                result = result.model_copy(update={"sub_calls": bridge.take_sub_calls()})
            finally:
                await quiet_kill(process)
        finally:
            self.running -= 1
            await bridge.aclose()
        self._metrics.observe_execution(result, time.perf_counter() - started)
        return StatelessExecuteResult(result=result, snapshot=snapshot)

    async def _check_snapshot(self, blob: bytes) -> None:
        """Refuse a snapshot that decompresses past `max_snapshot_bytes`, measured in steps
        (a decompression bomb costs one step of memory), before any sandbox is taken."""
        limit = self._settings.max_snapshot_bytes
        try:
            size = await asyncio.to_thread(blob_format.inflated_size, blob, limit)
        except SandboxBlobError as exc:
            raise ApiError(
                400, ErrorCode.BAD_SNAPSHOT, f"the snapshot cannot be restored: {exc}"
            ) from exc
        if size is None:
            raise ApiError(
                413,
                ErrorCode.SNAPSHOT_TOO_LARGE,
                f"the snapshot decompresses past {limit} bytes (RLM_SANDBOX_MAX_SNAPSHOT_BYTES)",
            )

    async def _bind_contexts(
        self,
        process: SandboxProcess,
        request: StatelessExecuteRequest,
        contents: list[CachedContext],
        *,
        restored: bool,
    ) -> None:
        """Bind the referenced contexts; after a restore, where its blob left them out."""
        refs = request.contexts or []
        missing = set(process.contexts_to_bind if restored else ()) - {r.index for r in refs}
        if missing:
            raise ApiError(
                400,
                ErrorCode.BAD_SNAPSHOT,
                f"the snapshot was taken without its context(s) of index {sorted(missing)}: "
                "name them in `contexts`",
            )
        try:
            for ref, content in zip(refs, contents, strict=True):
                await process.set_context_bytes(
                    content.payload,
                    ref.index,
                    kind=content.kind,
                    rebind=restored and not ref.fresh,
                )
        except SandboxGuestError as exc:
            raise ApiError(400, exc.type, f"the sandbox refused a context: {exc.message}") from exc
        except SandboxError as exc:
            raise ApiError(503, ErrorCode.UNAVAILABLE, f"the sandbox failed: {exc}") from exc

    async def _run(
        self,
        process: SandboxProcess,
        request: StatelessExecuteRequest,
        limits: SessionLimits,
    ) -> tuple[ExecutionResult, str]:
        try:
            if request.state is not None:
                await process.set_state(request.state)
            if request.context is not None:
                await process.set_context(request.context)
        except SandboxGuestError as exc:
            raise ApiError(
                400, exc.type, f"the sandbox refused the request: {exc.message}"
            ) from exc
        except SandboxError as exc:
            raise ApiError(503, ErrorCode.UNAVAILABLE, f"the sandbox failed: {exc}") from exc
        # execute() reports timeouts and crashes as results, not exceptions.
        result = await execute_bounded(
            process,
            request.code,
            timeout_s=limits.timeout_s,
            output_bytes=limits.output_bytes,
        )
        if not process.alive:
            # Killed (a timeout it ignored, or a crash): the caller keeps its last blob.
            self._metrics.restarts.inc()
            return result.model_copy(update={"state_lost": True}), request.snapshot or ""
        try:
            blob = await process.snapshot_namespace(contexts=request.contexts is None)
        except SandboxError as exc:
            raise ApiError(
                503, ErrorCode.UNAVAILABLE, f"the namespace could not be saved: {exc}"
            ) from exc
        return result, base64.b64encode(blob).decode()


def _decode(snapshot: str) -> bytes:
    try:
        return base64.b64decode(snapshot, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, ErrorCode.BAD_SNAPSHOT, "snapshot is not valid base64") from exc
