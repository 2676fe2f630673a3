"""The conversation API of `rlm serve`: several questions on one REPL (see `conversations`).

POST   /v1/conversations               {model?, context?, max_iterations?, max_depth?,
                                        budget?, temperature?, ...} -> 201 the conversation
POST   /v1/conversations/{id}/messages {query, context?} -> the answer of that question
GET    /v1/conversations/{id}          -> the conversation: its questions and answers so far
DELETE /v1/conversations/{id}          -> 204; its REPL and broker session end

`POST /v1/chat/completions` with `conversation: <id>` (the openai SDK's `extra_body`) asks
the last user message as the conversation's next question, streamed or not.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from host_poller.rlm.types import RLMResult
from host_poller.service.auth import Caller
from host_poller.service.conversations import ConversationRegistry, ServedConversation
from host_poller.service.models import (
    ConversationRequest,
    QuestionRequest,
    context_value,
    run_summary,
    wire_usage,
)
from host_poller.service.routes import authenticate, read_request


def registry_of(request: Request) -> ConversationRegistry:
    registry: ConversationRegistry = request.app.state.rlm_conversations
    return registry


async def _conversation(request: Request) -> tuple[ServedConversation, Caller]:
    """The conversation of the path, if the caller opened it (404 otherwise)."""
    caller = await authenticate(request)
    served = registry_of(request).get(request.path_params["conversation_id"], caller)
    return served, caller


async def create_conversation(request: Request) -> Response:
    caller = await authenticate(request)
    registry = registry_of(request)
    body = await read_request(request, ConversationRequest)
    plan = registry.service.plan_conversation(body).traced(request.headers.get("traceparent"))
    served = registry.start(plan.for_caller(caller), caller)
    return JSONResponse(served.to_json(), status_code=201)


async def ask(request: Request) -> Response:
    served, _ = await _conversation(request)
    registry = registry_of(request)
    body = await read_request(request, QuestionRequest)
    given = context_value(body.context) if body.context is not None else None
    context = registry.question_context(served, body.query, given)
    with registry.service.slot():
        result = await registry.ask(served, body.query, context)
    return JSONResponse(answer_body(served, result))


def answer_body(served: ServedConversation, result: RLMResult) -> dict[str, Any]:
    return {
        "id": served.id,
        "object": "rlm.conversation.answer",
        "turn": len(served.turns),
        "answer": result.answer,
        "usage": wire_usage(result.usage),
        "rlm": run_summary(result),
    }


async def get_conversation(request: Request) -> Response:
    served, _ = await _conversation(request)
    return JSONResponse(served.to_json())


async def delete_conversation(request: Request) -> Response:
    served, _ = await _conversation(request)
    await registry_of(request).close(served)
    return Response(status_code=204)
