"""The native run API of `rlm serve`: start a run, read it, follow its events, cancel it.

POST /v1/runs                {context, query, model?, max_iterations?, max_depth?, budget?}
                             -> 202 {id, status: "running", ...}
GET  /v1/runs/{id}           -> the run: status, and its answer, usage and `rlm` once done
GET  /v1/runs/{id}/events    -> server-sent events: each trajectory event (iterations with
                                their code and output, sub-calls, ...) as `event: <name>`,
                                from the first, then `event: end` with the run
POST /v1/runs/{id}/cancel    -> the run, cancelled (202 while it still stops)

Any replica on the run store's Redis answers for any run (`run_store`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from host_poller.service.models import RunRequest
from host_poller.service.routes import authenticate, read_request
from host_poller.service.run_store import RunRecord
from host_poller.service.runs import RunRegistry

#: How long a cancel waits for its run to stop before it answers (202, still running).
_CANCEL_WAIT_S = 10.0
#: A follower reads whether its run has ended at least this often (a run's end is a
#: field of its record, not an event of its stream).
_FOLLOW_POLL_S = 1.0
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _runs(request: Request) -> RunRegistry:
    registry: RunRegistry = request.app.state.rlm_runs
    return registry


async def _run(request: Request) -> RunRecord:
    """The run of the path, if the caller started it (404 otherwise, for every caller)."""
    caller = await authenticate(request)
    return await _runs(request).get(request.path_params["run_id"], caller)


async def create_run(request: Request) -> Response:
    caller = await authenticate(request)
    registry = _runs(request)
    body = await read_request(request, RunRequest)
    plan = registry.service.plan_run(body).traced(request.headers.get("traceparent"))
    run = await registry.start(plan.for_caller(caller), caller)
    return JSONResponse(run.to_json(), status_code=202)


async def get_run(request: Request) -> Response:
    return JSONResponse((await _run(request)).to_json())


async def cancel_run(request: Request) -> Response:
    run = await _runs(request).cancel(await _run(request), _CANCEL_WAIT_S)
    # Still running: the cancel is under way (on the replica that runs it); 202 says so.
    return JSONResponse(run.to_json(), status_code=202 if run.status == "running" else 200)


async def run_events(request: Request) -> Response:
    run = await _run(request)
    registry = _runs(request)
    return StreamingResponse(
        _follow(registry, run, registry.service.settings.heartbeat_s),
        media_type="text/event-stream",
        headers=_STREAM_HEADERS,
    )


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _sse_text(text: str) -> str:
    """A stored event (its JSON text) as `event: <name>`."""
    try:
        name = str(json.loads(text).get("event", "event"))
    except (ValueError, AttributeError):
        name = "event"
    return f"event: {name}\ndata: {text}\n\n"


async def _follow(registry: RunRegistry, run: RunRecord, heartbeat_s: float) -> AsyncIterator[str]:
    """Every event of `run` from the first kept, then new ones as they come, then the end.

    The record is read before the events: a run's events are all stored before its end,
    so once a record read says it ended, reading until no event is left reads them all."""
    store = registry.store
    cursor = "0"
    quiet_since = time.monotonic()
    while True:
        record = await store.get(run.id)
        if record is None:  # gone (its TTL) while followed: the end, as last read
            yield _sse("end", run.to_json())
            return
        run = record
        ended = record.status != "running"
        wait_s = 0.0 if ended else min(heartbeat_s, _FOLLOW_POLL_S)
        events = await store.read_events(run.id, cursor, wait_s)
        for event_cursor, text in events:
            cursor = event_cursor
            yield _sse_text(text)
        if events:
            quiet_since = time.monotonic()
        elif ended:
            yield _sse("end", record.to_json())
            return
        elif time.monotonic() - quiet_since >= heartbeat_s:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
