"""The scripted LLM as an OpenAI-compatible Starlette app.

Routes: POST /v1/chat/completions (plain and `stream: true` SSE), GET /v1/models, and
GET /_fake/stats (requests seen, rule hits, most requests in flight at once) for tests.
Fault counters and stats belong to one app instance and are safe across threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fake_llm.replies import render_reply
from fake_llm.scenario import Conversation, Faults, Scenario, match_rule

logger = logging.getLogger(__name__)

# Characters per streamed chunk: small enough that a reply spans several chunks.
_STREAM_CHUNK = 16


def count_tokens(text: str) -> int:
    """Deterministic token estimate: one token per 4 characters, at least one."""
    return len(text) // 4 + 1


class FakeLLMState:
    """Fault counters and request statistics of one server; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault_seen: Counter[str] = Counter()
        self.requests = 0
        self.rule_hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.failures_sent = 0
        #: (model, traceparent header or None) of the latest requests, oldest first.
        self.traceparents: deque[tuple[str, str | None]] = deque(maxlen=10_000)

    def should_fail(self, key: str, faults: Faults | None) -> bool:
        """Count one request against `faults` (keyed by rule or '*'); True if it must fail."""
        if faults is None or faults.fail_first_n == 0:
            return False
        with self._lock:
            self._fault_seen[key] += 1
            fail = self._fault_seen[key] <= faults.fail_first_n
            if fail:
                self.failures_sent += 1
            return fail

    def enter(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def hit(self, rule: str) -> None:
        with self._lock:
            self.rule_hits[rule] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "rule_hits": dict(self.rule_hits),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "failures_sent": self.failures_sent,
                "traceparents": list(self.traceparents),
            }


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _fault_response(faults: Faults) -> Response:
    headers: dict[str, str] = {}
    if faults.retry_after_s is not None:
        headers["retry-after"] = str(math.ceil(faults.retry_after_s))
        headers["retry-after-ms"] = str(round(faults.retry_after_s * 1000))
    if faults.status == 429:
        return _error(429, "fake-llm: rate limit (injected)", "rate_limit_exceeded", headers)
    message = f"fake-llm: error {faults.status} (injected)"
    return _error(faults.status, message, "server_error", headers)


async def _sleep_unless_disconnected(request: Request, delay_s: float) -> bool:
    """Sleep `delay_s`; return True early if the client went away meanwhile."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), timeout=delay_s)
    except TimeoutError:
        return False
    return True


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _stream(
    completion_id: str, model: str, text: str, usage: dict[str, int] | None
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **(extra or {}),
        }
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        for start in range(0, len(text), _STREAM_CHUNK):
            piece = text[start : start + _STREAM_CHUNK]
            yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if usage is not None:
            yield chunk([], {"usage": usage})
        yield "data: [DONE]\n\n"

    return events()


def create_app(scenario: Scenario, state: FakeLLMState | None = None) -> Starlette:
    """An OpenAI-compatible app answering from `scenario`."""
    state = state or FakeLLMState()

    async def chat_completions(request: Request) -> Response:
        state.enter()
        try:
            return await _complete(request)
        finally:
            state.leave()

    async def _complete(request: Request) -> Response:
        if scenario.api_key is not None:
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            if token != scenario.api_key:
                # Like OpenAI, echo the wrong key: the client must keep it out of its errors.
                message = f"Incorrect API key provided: {token}"
                return _error(401, message, "invalid_request_error")
        try:
            body = await request.json()
            model = str(body["model"])
            messages = list(body["messages"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "fake-llm: body needs model and messages", "invalid_request_error")
        if state.should_fail("*", scenario.faults):
            return _fault_response(scenario.faults)  # type: ignore[arg-type]
        state.traceparents.append((model, request.headers.get("traceparent")))
        conv = Conversation.from_messages(model, messages)
        matched = match_rule(scenario, conv)
        if matched is None:
            logger.warning("no rule matched", extra={"scenario": scenario.name, "model": model})
            return _error(
                400,
                f"fake-llm: no rule of scenario {scenario.name!r} matches this conversation "
                f"(model={model}, iteration={conv.iteration})",
                "invalid_request_error",
            )
        rule = matched.rule
        if state.should_fail(rule.name, rule.faults):
            return _fault_response(rule.faults)  # type: ignore[arg-type]
        delay = max(
            scenario.faults.delay_s if scenario.faults else 0.0,
            rule.faults.delay_s if rule.faults else 0.0,
        )
        if delay > 0 and await _sleep_unless_disconnected(request, delay):
            return Response(status_code=499)  # nobody is listening any more
        state.hit(rule.name)
        text = render_reply(conv, matched)
        usage = _usage(
            sum(count_tokens(str(m.get("content") or "")) for m in messages),
            count_tokens(text),
        )
        completion_id = f"chatcmpl-fake-{uuid.uuid4().hex[:12]}"
        if body.get("stream"):
            options = body.get("stream_options") or {}
            final_usage = usage if options.get("include_usage") else None
            return StreamingResponse(
                _stream(completion_id, model, text, final_usage),
                media_type="text/event-stream",
            )
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    async def models(request: Request) -> Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake-llm"}
            for name in scenario.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_fake/stats", stats, methods=["GET"]),
        ]
    )
    app.state.fake_llm = state
    app.state.scenario = scenario
    return app
