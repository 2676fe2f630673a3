"""The routes of `rlm serve`: chat completions (of a run, or of a conversation's next
question), the model list, health."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from host_poller.rlm.loop import EventHook
from host_poller.rlm.types import RLMResult
from host_poller.service.auth import Caller
from host_poller.service.conversations import ConversationRegistry
from host_poller.service.models import ChatRequest, completion_body, context_value
from host_poller.service.runner import RLMService
from host_poller.service.streaming import Once, RunCall, RunStream, stream_run
from rlm_wire.bodies import describe, read_body
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _service(request: Request) -> RLMService:
    service: RLMService = request.app.state.rlm_service
    return service


async def authenticate(request: Request) -> Caller:
    """Who calls: a static key's holder or a broker tenant (`host_poller.service.auth`);
    401 for any other key."""
    return await _service(request).auth.caller(request.headers.get("authorization"))


async def chat_completions(request: Request) -> Response:
    caller = await authenticate(request)
    service = _service(request)
    chat = await read_request(request, ChatRequest)
    if chat.conversation is not None:
        model, run = _next_question(request, chat, caller)
    else:
        plan = service.plan(chat).traced(request.headers.get("traceparent")).for_caller(caller)
        model = plan.model

        def run(on_event: EventHook | None) -> Awaitable[RLMResult]:
            return service.run(plan, on_event)

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not chat.stream:
        with service.slot():
            result = await run(None)
        return JSONResponse(completion_body(completion_id, model, result))
    service.acquire()  # held until the run is over: the stream releases it
    release = Once(service.release)
    include_usage = chat.stream_options is not None and chat.stream_options.include_usage
    body = stream_run(
        service, model, run, completion_id, include_usage=include_usage, release=release
    )
    return RunStream(body, release)


def _next_question(request: Request, chat: ChatRequest, caller: Caller) -> tuple[str, RunCall]:
    """The last user message as the next question of the request's conversation."""
    registry: ConversationRegistry = request.app.state.rlm_conversations
    served = registry.get(chat.conversation or "", caller)
    try:
        query = chat.query()
    except ValueError as exc:
        raise ApiError(400, ErrorCode.BAD_REQUEST, str(exc)) from exc
    given = context_value(chat.context) if chat.context is not None else None
    context = registry.question_context(served, query, given)

    def run(on_event: EventHook | None) -> Awaitable[RLMResult]:
        return registry.ask(served, query, context, on_event)

    return served.plan.model, run


async def read_request(request: Request, model: type[ModelT]) -> ModelT:
    """The body as `model`; 413 past RLM_SERVE_MAX_BODY_BYTES, 400 otherwise (OpenAI's
    status for a bad body), with `bad_request` for bad JSON, `invalid_body` for bad fields."""
    raw = await read_body(request, _service(request).settings.max_body_bytes)
    if not raw:
        raise ApiError(400, ErrorCode.BAD_REQUEST, "the request needs a JSON body")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        invalid_json = errors[0]["type"] == "json_invalid"
        code = ErrorCode.BAD_REQUEST if invalid_json else ErrorCode.INVALID_BODY
        raise ApiError(400, code, describe(exc)) from exc


async def models(request: Request) -> Response:
    await authenticate(request)
    service = _service(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "rlm-broker"}
                for name in service.model_names()
            ],
        }
    )


async def health(request: Request) -> Response:
    service = _service(request)
    return JSONResponse(
        {
            "status": "ok",
            "runs_in_flight": service.in_flight,
            "conversations_open": len(request.app.state.rlm_conversations),
            "concurrency": service.settings.concurrency,
        }
    )
