"""The broker's OpenAPI 3.1 document, served at `GET /openapi.json`.

Every schema in it comes from the wire models of `rlm_wire.broker_models` (pydantic's JSON Schema,
with `$defs` moved under `components/schemas`), and every bound of a query value from the
`BrokerSettings` the broker runs with, so the document cannot drift from what the broker
accepts. What is written by hand here is only the list of operations (a test checks it
against the app's routes) and which statuses each may answer with (docs/protocol.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from broker import __version__
from broker.auth import Scope
from broker.poll_ids import POLL_ID_PATTERN
from broker.settings import BrokerSettings
from rlm_wire import broker_models as p

OPENAPI_VERSION = "3.1.0"

_JSON = "application/json"
_SCHEMA_REF = "#/components/schemas/{model}"

#: What each error status means; the body is always `ErrorBody`.
_ERRORS: dict[int, str] = {
    400: "bad_request: malformed JSON, an empty body, a bad query value",
    401: "unauthorized: no bearer token; an unknown, revoked or expired one",
    403: "forbidden: a token of the wrong scope, or another tenant's or session's request",
    404: "not_found: an unknown request, session or tenant",
    410: "result_expired: an Idempotency-Key replayed after its requests' results expired",
    413: "payload_too_large: a body over RLM_MAX_BODY_BYTES, a batch over its limit, or "
    "session metadata over RLM_MAX_SESSION_METADATA_BYTES",
    422: "invalid_body: a body that does not fit the model (the message names each field)",
    429: "too_many_requests: a session over RLM_MAX_OPEN_PER_SESSION unanswered requests; "
    "quota_exceeded (with Retry-After): a tenant over a quota (RLM_TENANT_MAX_*)",
    500: "internal_error: a bug (logged with its traceback, never sent)",
    503: "redis_unavailable: the broker's Redis is unreachable; retry",
}

#: The models a JSON body may be (more than one: `oneOf`).
Body = tuple[type[BaseModel], ...]


@dataclass(frozen=True)
class _Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class _Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    scopes: tuple[Scope, ...]  # empty: no auth
    request: Body = ()
    ok: dict[int, Body] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    query: tuple[_Query, ...] = ()
    headers: tuple[_Query, ...] = ()
    #: a 200 answer that is no wire model: (media type, JSON Schema of its body)
    raw_ok: tuple[str, dict[str, Any]] | None = None


def _operations(settings: BrokerSettings) -> list[_Operation]:
    wait_doc = "Seconds to wait for an answer before answering 202 `pending`."

    def wait(default: float, doc: str = wait_doc) -> _Query:
        bounds = {"minimum": 0, "maximum": settings.max_wait_s, "default": default}
        return _Query("wait", {"type": "number", **bounds}, doc)

    body_errors = (400, 401, 403, 413, 422, 500, 503)
    return [
        _Operation(
            "post",
            "/tenants",
            "create_tenant",
            "Create a tenant; its token is shown once.",
            ("admin",),
            request=(p.CreateTenant,),
            ok={201: (p.TenantCreated,)},
            errors=body_errors,
        ),
        _Operation(
            "get",
            "/tenants/self",
            "tenant_self",
            "Who a tenant token is: its tenant id (any other token is refused).",
            ("tenant",),
            ok={200: (p.TenantSelf,)},
            errors=(401, 403, 500, 503),
        ),
        _Operation(
            "post",
            "/sessions",
            "create_session",
            "Open a session; its token is for sandboxed code (an admin names the tenant).",
            ("tenant", "admin"),
            request=(p.CreateSession,),
            ok={201: (p.SessionCreated,)},
            errors=(*body_errors, 404, 429),
        ),
        _Operation(
            "delete",
            "/sessions/{session_id}",
            "delete_session",
            "Close a session: revoke its token, fail its unanswered requests.",
            ("tenant", "admin"),
            ok={200: (p.SessionClosed,)},
            errors=(401, 403, 404, 422, 500, 503),
            query=(_Query("tenant_id", {"type": "string"}, "Admin only: the session's tenant."),),
        ),
        _Operation(
            "post",
            "/enqueue",
            "enqueue",
            "Enqueue one request or a batch and wait for the answers (202 when the wait ends "
            "first).",
            ("session",),
            request=(p.LLMRequest, p.EnqueueBatch),
            ok={200: (p.RequestResult, p.BatchResults), 202: (p.RequestResult, p.BatchResults)},
            errors=(*body_errors, 410, 429),
            query=(wait(settings.default_wait_s),),
            headers=(
                _Query(
                    "Idempotency-Key",
                    # 1-200 printable ASCII characters. The whitespace around a header
                    # value is not part of it (HTTP strips it before the broker sees the
                    # value), so the bounds are in the pattern, not in min/maxLength.
                    {"type": "string", "pattern": r"^[\t ]*[!-~](?:[ -~]{0,198}[!-~])?[\t ]*$"},
                    "Unique per call: a repeated POST with it enqueues nothing twice and "
                    "answers with the requests it enqueued the first time.",
                ),
            ),
        ),
        _Operation(
            "get",
            "/requests/{request_id}",
            "get_request",
            "A request's result, waiting for it (202 when the wait ends first).",
            ("session", "tenant", "admin"),
            ok={200: (p.RequestResult,), 202: (p.RequestResult,)},
            errors=(400, 401, 403, 404, 500, 503),
            query=(wait(settings.default_wait_s),),
        ),
        _Operation(
            "get",
            "/pending",
            "pending",
            "Lease up to `max` waiting requests, long-polling up to `wait` seconds.",
            ("tenant", "admin"),
            ok={200: (p.PendingBatch,)},
            errors=(400, 401, 403, 500, 503),
            query=(
                _Query(
                    "max",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": settings.max_pending_batch,
                        "default": settings.default_pending_max,
                    },
                    "Most requests to lease.",
                ),
                wait(settings.default_pending_wait_s, "Seconds to wait for work to arrive."),
                _Query(
                    "poll",
                    {"type": "string", "pattern": POLL_ID_PATTERN},
                    "This long-poll's id, fresh and random per call: recorded with its leases.",
                ),
                _Query(
                    "abandoned",
                    {"type": "string"},
                    "Comma-separated poll ids of the caller's earlier long-polls whose answer "
                    f"never arrived whole (at most {settings.max_abandoned_polls}): what they "
                    "still hold is handed back at once (docs/protocol.md).",
                ),
            ),
        ),
        _Operation(
            "post",
            "/respond",
            "respond",
            "Answer one request or a batch; the first answer wins.",
            ("tenant", "admin"),
            request=(p.Answer, p.AnswerBatch),
            ok={200: (p.RespondResult, p.RespondResults)},
            errors=(*body_errors, 404),
        ),
        _Operation(
            "post",
            "/leases/extend",
            "extend_leases",
            "Keep requests leased while their LLM calls run.",
            ("tenant", "admin"),
            request=(p.ExtendLeases,),
            ok={200: (p.LeaseResults,)},
            errors=body_errors,
        ),
        _Operation(
            "post",
            "/leases/release",
            "release_leases",
            "Hand back what this poller will not answer (requests by id, and what its lost "
            "long-polls hold): delivered again at once.",
            ("tenant", "admin"),
            request=(p.ReleaseLeases,),
            ok={200: (p.ReleaseResults,)},
            errors=body_errors,
        ),
        _Operation(
            "get",
            "/health",
            "health",
            "Readiness: Redis, queue depths, pollers.",
            (),
            ok={200: (p.Health,), 503: (p.Health,)},
            errors=(500,),
        ),
        _Operation(
            "get",
            "/health/live",
            "live",
            "Liveness: answers without touching Redis.",
            (),
            ok={200: (p.Liveness,)},
            errors=(500,),
        ),
        _Operation(
            "get",
            "/metrics",
            "metrics",
            "Prometheus metrics (text format).",
            (),
            errors=(500,),
            raw_ok=("text/plain", {"type": "string"}),
        ),
        _Operation(
            "get",
            "/openapi.json",
            "openapi",
            "This document.",
            (),
            raw_ok=(_JSON, {"type": "object"}),
        ),
    ]


def build_openapi(settings: BrokerSettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a broker running with `settings`."""
    operations = _operations(settings)
    refs, schemas = _schemas(operations)

    def content(models: Body, mode: JsonSchemaMode) -> dict[str, Any]:
        found = [refs[model, mode] for model in models]
        return {_JSON: {"schema": found[0] if len(found) == 1 else {"oneOf": found}}}

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        spec: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
        if op.scopes:
            spec["description"] = f"Token scopes: {', '.join(op.scopes)}."
            spec["x-rlm-scopes"] = list(op.scopes)
        else:
            spec["security"] = []
        params = [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "schema": q.schema,
                "description": q.description,
            }
            for q in op.query
        ]
        params += [
            {"name": h.name, "in": "header", "required": False, "schema": h.schema,
             "description": h.description}
            for h in op.headers
        ]  # fmt: skip
        params += [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_parameters(op.path)
        ]
        if params:
            spec["parameters"] = params
        if op.request:
            spec["requestBody"] = {"required": True, "content": content(op.request, "validation")}
        responses: dict[str, Any] = {}
        for status, models in op.ok.items():
            responses[str(status)] = {
                "description": _reason(status),
                "content": content(models, "serialization"),
            }
        if op.raw_ok is not None:
            media_type, schema = op.raw_ok
            responses["200"] = {"description": "OK", "content": {media_type: {"schema": schema}}}
        for status in sorted(op.errors):
            responses[str(status)] = {
                "description": _ERRORS[status],
                "content": {_JSON: {"schema": {"$ref": _SCHEMA_REF.format(model="ErrorBody")}}},
            }
        spec["responses"] = dict(sorted(responses.items()))
        paths.setdefault(op.path, {})[op.method] = spec
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "rlm-broker",
            "version": __version__,
            "description": f"The broker's wire protocol, version {p.PROTOCOL_VERSION} "
            "(docs/protocol.md). Every error answers `ErrorBody`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin (RLM_ADMIN_TOKEN), tenant or session token.",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def openapi_json(settings: BrokerSettings) -> bytes:
    """`build_openapi(settings)` as the bytes `/openapi.json` answers with."""
    return json.dumps(build_openapi(settings), separators=(",", ":")).encode()


Refs = dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]


def _schemas(operations: list[_Operation]) -> tuple[Refs, dict[str, Any]]:
    """A `$ref` for each (model, mode) of `operations`, and every schema they need, by name.

    Request bodies get the schema of what the broker validates, answers of what it sends;
    a model whose two schemas differ gets two names (pydantic's `-Input` / `-Output`).
    """
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(p.ErrorBody, "serialization")]
    for op in operations:
        wanted += [(model, "validation") for model in op.request]
        for models in op.ok.values():
            wanted += [(model, "serialization") for model in models]
    by_key, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_SCHEMA_REF)
    refs: Refs = {}
    for (model, mode), schema in by_key.items():
        if issubclass(model, BaseModel):  # always: only models are asked for
            refs[model, mode] = schema
    return refs, dict(sorted(top.get("$defs", {}).items()))


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _reason(status: int) -> str:
    return {200: "OK", 201: "Created", 202: "Accepted: still pending", 503: "Degraded"}.get(
        status, str(status)
    )


__all__ = ["OPENAPI_VERSION", "build_openapi", "openapi_json"]
