"""The native run API's runs: started in the background, read, followed and cancelled by id.

A `RunRegistry` keeps each run's status, its progress events (the trajectory's, as they
happen: iterations, sub-calls, the end) and its result or error, in memory. Every run
belongs to the key that started it (a static key or a tenant token, `service.auth`): any
other key gets 404 for it. Finished runs are forgotten after `RLM_SERVE_RUN_TTL_S`, and at
most `RLM_SERVE_MAX_RUNS` are kept (a new run past that is 429 while they all still go). A
run holds one of the service's run slots until it ends, like a chat completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from host_poller.rlm.types import RLMResult
from host_poller.service.auth import Caller
from host_poller.service.errors import error_body
from host_poller.service.models import run_summary, wire_usage
from host_poller.service.runner import RLMService, RunPlan
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)

Status = Literal["running", "succeeded", "failed", "cancelled"]

#: Events kept per run (the oldest are dropped past it; `dropped_events` counts them).
MAX_EVENTS = 10_000


@dataclass
class Run:
    id: str
    owner: str
    model: str
    created: float
    status: Status = "running"
    events: list[dict[str, Any]] = field(default_factory=list)
    dropped_events: int = 0
    result: RLMResult | None = None
    error: dict[str, Any] | None = None
    finished: float | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add_event(self, event: str, fields: dict[str, Any]) -> None:
        if len(self.events) >= MAX_EVENTS:
            self.events.pop(0)
            self.dropped_events += 1
        self.events.append({"event": event, **fields})
        self._wake()

    def _wake(self) -> None:
        # Followers wait on `changed`; a new Event for the next change, the old one set.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def finish(self, status: Status, *, error: dict[str, Any] | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        self._wake()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "rlm.run",
            "model": self.model,
            "status": self.status,
            "created": int(self.created),
            "events": len(self.events) + self.dropped_events,
        }
        if self.result is not None:
            body["answer"] = self.result.answer
            body["usage"] = wire_usage(self.result.usage)
            body["rlm"] = run_summary(self.result)
        if self.error is not None:
            body["error"] = self.error
        return body


class RunRegistry:
    """The runs of one service, by id."""

    def __init__(self, service: RLMService) -> None:
        self.service = service
        self._runs: dict[str, Run] = {}

    def start(self, plan: RunPlan, caller: Caller) -> Run:
        """Start `plan` in the background for `caller`; 429 when full."""
        self._forget_expired()
        if len(self._runs) >= self.service.settings.max_runs:
            raise ApiError(
                429,
                ErrorCode.TOO_MANY_REQUESTS,
                f"{len(self._runs)} runs are kept (RLM_SERVE_MAX_RUNS); retry later",
                headers={"Retry-After": "1"},
            )
        self.service.acquire()
        run = Run(id=f"run-{uuid.uuid4().hex}", owner=caller.owner, model=plan.model,
                  created=time.time())  # fmt: skip
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._drive(run, plan), name=f"rlm-serve-{run.id}")
        # A done callback, not a `finally`: it runs even for a task cancelled before it began.
        run.task.add_done_callback(lambda _task: self._ended(run))
        return run

    def _ended(self, run: Run) -> None:
        if run.status == "running":  # cancelled before its first step
            run.finish("cancelled")
        self.service.release()

    async def _drive(self, run: Run, plan: RunPlan) -> None:
        try:
            run.result = await self.service.run(plan, run.add_event)
            run.finish("succeeded")
        except ApiError as exc:
            run.finish("failed", error=error_body(exc.status, exc.code, exc.message)["error"])
        except asyncio.CancelledError:
            run.finish("cancelled")
        except Exception:
            logger.exception("run failed", extra={"id": run.id})
            body = error_body(500, ErrorCode.INTERNAL_ERROR, "internal error (logged)")
            run.finish("failed", error=body["error"])

    def get(self, run_id: str, caller: Caller) -> Run:
        """The run, if `caller` started it; else 404 (which runs exist is not told)."""
        run = self._runs.get(run_id)
        if run is None or run.owner != caller.owner:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no run {run_id!r}")
        return run

    def cancel(self, run: Run) -> None:
        if run.task is not None and not run.task.done():
            run.task.cancel()

    def _forget_expired(self) -> None:
        cutoff = time.time() - self.service.settings.run_ttl_s
        for run_id in [i for i, r in self._runs.items() if r.finished and r.finished < cutoff]:
            del self._runs[run_id]

    async def aclose(self) -> None:
        """Cancel the runs still going (the service is stopping)."""
        tasks = [r.task for r in self._runs.values() if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
