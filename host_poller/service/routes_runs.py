"""The native run API of `rlm serve`: start a run, read it, follow its events, cancel it.

POST /v1/runs                {context, query, model?, max_iterations?, max_depth?, budget?}
                             -> 202 {id, status: "running", ...}
GET  /v1/runs/{id}           -> the run: status, and its answer, usage and `rlm` once done
GET  /v1/runs/{id}/events    -> server-sent events: each trajectory event (iterations with
                                their code and output, sub-calls, ...) as `event: <name>`,
                                from the first, then `event: end` with the run
POST /v1/runs/{id}/cancel    -> the run, cancelled
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from host_poller.service.models import RunRequest
from host_poller.service.routes import authenticate, read_request
from host_poller.service.runs import Run, RunRegistry

#: How long a cancel waits for its run to stop before it answers.
_CANCEL_WAIT_S = 10.0
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _runs(request: Request) -> RunRegistry:
    registry: RunRegistry = request.app.state.rlm_runs
    return registry


async def _run(request: Request) -> Run:
    """The run of the path, if the caller started it (404 otherwise, for every caller)."""
    caller = await authenticate(request)
    return _runs(request).get(request.path_params["run_id"], caller)


async def create_run(request: Request) -> Response:
    caller = await authenticate(request)
    registry = _runs(request)
    body = await read_request(request, RunRequest)
    plan = registry.service.plan_run(body).traced(request.headers.get("traceparent"))
    run = registry.start(plan.for_caller(caller), caller)
    return JSONResponse(run.to_json(), status_code=202)


async def get_run(request: Request) -> Response:
    return JSONResponse((await _run(request)).to_json())


async def cancel_run(request: Request) -> Response:
    run = await _run(request)
    _runs(request).cancel(run)
    if run.task is not None and not run.task.done():
        await asyncio.wait([run.task], timeout=_CANCEL_WAIT_S)
    return JSONResponse(run.to_json())


async def run_events(request: Request) -> Response:
    run = await _run(request)
    heartbeat = _runs(request).service.settings.heartbeat_s
    return StreamingResponse(
        _follow(run, heartbeat), media_type="text/event-stream", headers=_STREAM_HEADERS
    )


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


async def _follow(run: Run, heartbeat_s: float) -> AsyncIterator[str]:
    """Every event of `run` from the first kept, then new ones as they come, then the end."""
    sent = 0
    while True:
        changed = run.changed  # taken before reading, so no change is missed in between
        skipped = run.dropped_events
        events = run.events
        start = max(0, sent - skipped)
        for event in events[start:]:
            yield _sse(str(event.get("event", "event")), event)
        sent = skipped + len(events)
        if run.status != "running":
            yield _sse("end", run.to_json())
            return
        try:
            await asyncio.wait_for(changed.wait(), timeout=heartbeat_s)
        except TimeoutError:
            yield ": keep-alive\n\n"
