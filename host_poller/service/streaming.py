"""`stream: true`: the run's answer as standard `chat.completion.chunk` server-sent events.

The first chunk carries the assistant role at once; while the run works, its progress goes
out as SSE comments (`: rlm {...}`), which every SSE client skips and which keep proxies
from closing an idle connection; then the answer, a last chunk with `finish_reason` (and
the whole run's usage), one usage-only chunk if `stream_options.include_usage`, and
`data: [DONE]`. A run that breaks ends the stream with an OpenAI error event
(`data: {"error": {...}}`), which the openai SDK raises as an `APIError`. When the client
goes away the run is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from host_poller.rlm.loop import EventHook
from host_poller.rlm.types import RLMResult
from host_poller.service.errors import error_body
from host_poller.service.models import chunk_body, finish_reason, run_summary
from host_poller.service.runner import RLMService
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)

#: Headers of a streamed answer: no caching, and no buffering by proxies such as nginx.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Progress comments kept waiting at most: a slow reader loses progress, never the answer.
_MAX_PENDING_EVENTS = 1000
#: The answer is sent in pieces of this many characters.
_PIECE_CHARS = 256
#: Events that become progress comments, and the fields they keep.
_PROGRESS_FIELDS = {
    "iteration_start": ("depth", "index"),
    "iteration": ("depth", "index", "run_usage", "sub_calls"),
    "sub_call": ("depth", "kind", "model", "usage"),
    "last_call": ("depth",),
}


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _comment(event: str, fields: dict[str, Any]) -> str:
    kept = {k: fields[k] for k in _PROGRESS_FIELDS[event] if k in fields}
    return f": rlm {json.dumps({'event': event, **kept}, separators=(',', ':'))}\n\n"


class Once:
    """Calls `fn` the first time it is called, never again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class RunStream(StreamingResponse):
    """A streamed run's response: its slot is released when the response ends, even when
    the client left before the body began (Starlette then never starts the body)."""

    def __init__(self, content: AsyncIterator[str], release: Once) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_STREAM_HEADERS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


#: Runs the answer of a streamed request, reporting progress to the hook it is given.
RunCall = Callable[[EventHook | None], Awaitable[RLMResult]]


def stream_run(
    service: RLMService,
    model: str,
    run: RunCall,
    completion_id: str,
    *,
    include_usage: bool,
    release: Once,
) -> AsyncIterator[str]:
    """The SSE body of one streamed run (or conversation turn) of `model`; `release` frees
    its concurrency slot as soon as the run is over (`RunStream` makes sure of it when the
    body never ran)."""
    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, **extra: Any) -> str:
        return _data(chunk_body(completion_id, model, created, delta, **extra))

    async def events() -> AsyncIterator[str]:
        progress: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(event: str, fields: dict[str, Any]) -> None:
            if event in _PROGRESS_FIELDS and progress.qsize() < _MAX_PENDING_EVENTS:
                # Events may come from the environment's thread: hand them to the loop.
                loop.call_soon_threadsafe(progress.put_nowait, _comment(event, fields))

        task = asyncio.create_task(_awaited(run(on_event)), name=f"rlm-serve-{completion_id}")

        try:
            yield chunk({"role": "assistant", "content": ""})
            while not task.done():
                waiter = asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait(
                    {task, waiter},
                    timeout=service.settings.heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if waiter in done:
                    yield waiter.result()
                    continue
                waiter.cancel()
                if not done:
                    yield ": keep-alive\n\n"
            # The run is over: its slot is free before the client reads the end of the stream.
            release()
            while not progress.empty():
                yield progress.get_nowait()
            try:
                result = task.result()
            except ApiError as exc:
                yield _data(error_body(exc.status, exc.code, exc.message))
                yield "data: [DONE]\n\n"
                return
            for text in _answer_chunks(chunk, result):
                yield text
            if include_usage:
                yield chunk(None, usage=result.usage)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            logger.info("streamed run cancelled (client gone)", extra={"id": completion_id})
            raise
        except Exception:
            logger.exception("streamed run failed", extra={"id": completion_id})
            body = error_body(500, ErrorCode.INTERNAL_ERROR, "internal error (logged)")
            yield _data(body)
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass  # what cancel() asked for
                except Exception:
                    logger.exception("run failed while stopping", extra={"id": completion_id})
            release()

    return events()


async def _awaited(answer: Awaitable[RLMResult]) -> RLMResult:
    return await answer


def _answer_chunks(chunk: Callable[..., str], result: RLMResult) -> list[str]:
    answer = result.answer or ""
    pieces = [chunk({"content": answer[i : i + _PIECE_CHARS]})
              for i in range(0, len(answer), _PIECE_CHARS)]  # fmt: skip
    pieces.append(
        chunk({}, finish=finish_reason(result), usage=result.usage,
              extra={"rlm": run_summary(result)})
    )  # fmt: skip
    return pieces
