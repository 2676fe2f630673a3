"""The routes of `rlm serve`: chat completions, the model list, health."""

from __future__ import annotations

import hmac
import uuid
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from host_poller.service.models import ChatRequest, completion_body
from host_poller.service.runner import RLMService
from host_poller.service.streaming import Once, RunStream, stream_run
from rlm_wire.bodies import describe, read_body
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _service(request: Request) -> RLMService:
    service: RLMService = request.app.state.rlm_service
    return service


def authenticate(request: Request) -> str:
    """The bearer key, which must be one of RLM_SERVE_API_KEYS (none configured: open, on
    loopback only, and every caller is "")."""
    keys = _service(request).settings.keys()
    if not keys:
        return ""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    # Compare with every key, each in constant time, so timing tells nothing of them.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(
            401,
            ErrorCode.UNAUTHORIZED,
            "missing or unknown API key: send `Authorization: Bearer <key>` with a key of "
            "RLM_SERVE_API_KEYS",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return given


async def chat_completions(request: Request) -> Response:
    authenticate(request)
    service = _service(request)
    chat = await read_request(request, ChatRequest)
    plan = service.plan(chat).traced(request.headers.get("traceparent"))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not chat.stream:
        with service.slot():
            result = await service.run(plan)
        return JSONResponse(completion_body(completion_id, plan.model, result))
    service.acquire()  # held until the run is over: the stream releases it
    release = Once(service.release)
    include_usage = chat.stream_options is not None and chat.stream_options.include_usage
    body = stream_run(service, plan, completion_id, include_usage=include_usage, release=release)
    return RunStream(body, release)


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
    authenticate(request)
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
            "concurrency": service.settings.concurrency,
        }
    )
