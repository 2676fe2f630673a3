"""The native run API's runs: started in the background, read, followed and cancelled by id.

A `RunRegistry` drives this replica's runs and keeps them in a `RunStore` (`run_store`):
each run's record (status, answer or error), its progress events (the trajectory's, as
they happen) and, with Redis, what every other replica needs to read, follow and cancel
it. Every run belongs to the key that started it (a static key or a tenant token,
`service.auth`): any other key gets 404 for it, on every replica. A run holds one of this
replica's run slots until it ends, like a chat completion. When the service stops, its
runs still going are cancelled and stored so.

A run's end that the store cannot take (Redis down or restarting) is kept here and stored
again every lease interval until it is taken: this replica reads the run as ended at once,
the others read it as running meanwhile (the replica's lease is still renewed), never as
running until the record's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from host_poller.rlm.types import RLMResult
from host_poller.service.auth import Caller
from host_poller.service.errors import error_body
from host_poller.service.models import run_summary, wire_usage
from host_poller.service.run_store import MAX_EVENTS, RunRecord, RunsFull, RunStore, Status
from host_poller.service.runner import RLMService, RunPlan
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["MAX_EVENTS", "RunRecord", "RunRegistry"]

#: How often a cancel of another replica's run reads whether it has stopped.
_CANCEL_POLL_S = 0.1


def _encode(event: str, fields: dict[str, Any], max_bytes: int) -> str:
    text = json.dumps({"event": event, **fields}, separators=(",", ":"), default=str)
    if len(text.encode()) <= max_bytes:
        return text
    # Too large to keep (RLM_SERVE_MAX_EVENT_BYTES): its name and size; the trajectory has it.
    stub = {"event": event, "truncated": True, "bytes": len(text.encode())}
    return json.dumps(stub, separators=(",", ":"))


def _outcome(
    answer: RLMResult, max_bytes: int
) -> tuple[Status, dict[str, Any] | None, dict[str, Any] | None]:
    """A finished run's status, result and error: an answer too large to keep
    (RLM_SERVE_MAX_ANSWER_BYTES) fails the run; the trajectory has it."""
    result = {"answer": answer.answer, "usage": wire_usage(answer.usage),
              "rlm": run_summary(answer)}  # fmt: skip
    size = len(json.dumps(result).encode())
    if size <= max_bytes:
        return "succeeded", result, None
    message = (
        f"the answer of {size} bytes exceeds RLM_SERVE_MAX_ANSWER_BYTES; the trajectory of "
        f"run {answer.run_id} has it"
    )
    return "failed", None, error_body(502, ErrorCode.ANSWER_TOO_LARGE, message)["error"]


class _EventWriter:
    """Hands a run's events to the store in batches, in order, off the run's path: the
    event hook is synchronous and may be called from the environment's thread."""

    def __init__(self, store: RunStore, run_id: str, max_bytes: int) -> None:
        self._store, self._run_id, self._max_bytes = store, run_id, max_bytes
        self._loop = asyncio.get_running_loop()
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.count = 0
        self._task = asyncio.create_task(self._write(), name=f"rlm-serve-events-{run_id}")

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        text = _encode(event, fields, self._max_bytes)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._push(text)
        else:
            self._loop.call_soon_threadsafe(self._push, text)

    def _push(self, text: str) -> None:
        self._pending.append(text)
        del self._pending[:-MAX_EVENTS]  # a store slower than the run: the oldest go first
        self.count += 1
        self._wake.set()

    async def _write(self) -> None:
        while not self._closed or self._pending:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self._store.append(self._run_id, batch)
            except Exception:  # the top of this task: the run goes on without these events
                logger.exception("run events not stored", extra={"id": self._run_id})

    async def close(self) -> None:
        """Store every event handed in so far (before the run's end is stored)."""
        self._closed = True
        self._wake.set()
        await self._task


@dataclass
class _Local:
    """A run this replica drives."""

    record: RunRecord
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once its end is known here; it is in the store once the run leaves `_local`."""


class RunRegistry:
    """This replica's runs, kept in `store` with every other replica's."""

    def __init__(self, service: RLMService, store: RunStore) -> None:
        self.service = service
        self.store = store
        self._local: dict[str, _Local] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def open(self) -> None:
        await self.store.open(self._cancel_local)

    async def start(self, plan: RunPlan, caller: Caller) -> RunRecord:
        """Start `plan` in the background for `caller`; 429 when full."""
        self.service.acquire()
        record = RunRecord(id=f"run-{uuid.uuid4().hex}", owner=caller.owner, model=plan.model,
                           created=time.time(), replica=self.store.replica)  # fmt: skip
        try:
            await self.store.add(record)
        except RunsFull as exc:
            self.service.release()
            raise ApiError(
                429,
                ErrorCode.TOO_MANY_REQUESTS,
                f"{exc.kept} runs are kept (RLM_SERVE_MAX_RUNS); retry later",
                headers={"Retry-After": "1"},
            ) from exc
        except BaseException:
            self.service.release()
            raise
        local = self._local[record.id] = _Local(record)
        local.task = asyncio.create_task(self._drive(local, plan), name=f"rlm-serve-{record.id}")
        # A done callback, not a `finally`: it runs even for a task cancelled before it began.
        local.task.add_done_callback(lambda _task: self._ended(local))
        return record

    def _ended(self, local: _Local) -> None:
        self.service.release()
        if local.record.status == "running":  # cancelled before its first step
            task = asyncio.create_task(self._store_end(local, "cancelled"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            self._local.pop(local.record.id, None)

    async def _drive(self, local: _Local, plan: RunPlan) -> None:
        writer = _EventWriter(self.store, local.record.id, self.service.settings.max_event_bytes)
        status: Status = "failed"
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            answer = await self.service.run(plan, writer)
            status, result, error = _outcome(answer, self.service.settings.max_answer_bytes)
        except ApiError as exc:
            error = error_body(exc.status, exc.code, exc.message)["error"]
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception:
            logger.exception("run failed", extra={"id": local.record.id})
            error = error_body(500, ErrorCode.INTERNAL_ERROR, "internal error (logged)")["error"]
        await writer.close()
        await self._store_end(local, status, result=result, error=error, events=writer.count)

    async def _store_end(
        self,
        local: _Local,
        status: Status,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        events: int | None = None,
    ) -> None:
        local.record = local.record.ended(status, result=result, error=error, events=events)
        local.ended.set()
        try:
            await self._store_end_until_taken(local.record)
        finally:
            self._local.pop(local.record.id, None)

    async def _store_end_until_taken(self, record: RunRecord) -> None:
        """Store `record`, again every lease interval while the store refuses it, until it
        is taken, the service stops (one last try) or the record would have expired."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.store.running_ttl_s
        failures = 0
        while True:
            try:
                await self.store.finish(record)
            except ApiError as exc:  # unreachable: kept and tried again
                failures += 1
                last = self._stopping.is_set() or loop.time() >= give_up_at
                if failures == 1 or last:
                    log = logger.error if last else logger.warning
                    log("run end not stored" + ("" if last else "; retrying"),
                        extra={"id": record.id, "error": exc.message})  # fmt: skip
                if last:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stopping.wait(), self.service.settings.lease_interval_s
                    )
                continue
            except Exception:  # a bug, not the store's reach: the record's TTL bounds it
                logger.exception("run end not stored", extra={"id": record.id})
                return
            if failures:
                logger.info("run end stored", extra={"id": record.id, "failures": failures})
            return

    async def get(self, run_id: str, caller: Caller) -> RunRecord:
        """The run, if `caller` started it; else 404 (which runs exist is not told)."""
        local = self._local.get(run_id)
        record = local.record if local is not None and local.ended.is_set() else None
        if record is None:
            record = await self.store.get(run_id)
        if record is None or record.owner != caller.owner:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no run {run_id!r}")
        return record

    async def cancel(self, record: RunRecord, wait_s: float) -> RunRecord:
        """Cancel the run (here, or through the replica running it) and wait up to `wait_s`
        for it to stop; the run as it is then (still `running` if it has not stopped)."""
        if record.status != "running":
            return record
        local = self._local.get(record.id)
        if local is not None:
            self._cancel_local(record.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(local.ended.wait(), timeout=wait_s)
            return local.record
        # Another replica's run: it gets the cancel on the store's channel; its end is read
        # back from the store (a replica gone meanwhile: the run reads as interrupted).
        await self.store.request_cancel(record.id)
        deadline = time.monotonic() + wait_s
        while record.status == "running" and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL_S)
            record = await self.store.get(record.id) or record
        return record

    def _cancel_local(self, run_id: str) -> None:
        local = self._local.get(run_id)
        if local is not None and local.task is not None and not local.task.done():
            logger.info("run cancelled", extra={"id": run_id})
            local.task.cancel()

    async def aclose(self) -> None:
        """Cancel the runs still going (the service is stopping), store them so, and stop
        following the store."""
        self._stopping.set()  # ends still being stored make one last try
        tasks = [r.task for r in self._local.values() if r.task is not None and not r.task.done()]
        for local in self._local.values():
            if local.task is not None and not local.ended.is_set():
                local.task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._closing:
            await asyncio.wait(list(self._closing))
        await self.store.aclose()
