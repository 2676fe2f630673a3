"""Tenants and sessions: `POST /tenants`, `GET /tenants/self`, `POST /sessions`,
`DELETE /sessions/{id}`."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from broker.auth import Principal
from broker.context import context_of, principal_of
from broker.handling import endpoint
from broker.keys import is_session_id, is_tenant_id
from rlm_wire import broker_models as p
from rlm_wire.bodies import read_json, validate
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.responses import json_response

logger = logging.getLogger(__name__)


@endpoint("create_tenant")
async def create_tenant(request: Request) -> Response:
    ctx = context_of(request)
    (await principal_of(request)).require("admin")
    body = validate(p.CreateTenant, await read_json(request, ctx.settings.max_body_bytes))
    tenant_id, token = await ctx.store.create_tenant(body.name)
    logger.info("tenant created", extra={"tenant_id": tenant_id})
    return json_response(p.TenantCreated(tenant_id=tenant_id, token=token).model_dump_json(), 201)


@endpoint("tenant_self")
async def tenant_self(request: Request) -> Response:
    """Who a tenant token is: its tenant id. Any other token is refused (403 for a session or
    admin token, 401 for an unknown one), so a service taking tenant tokens as its own keys
    (`rlm serve`) can tell them from the session tokens that sandboxed code holds."""
    principal = await principal_of(request)
    principal.require("tenant")
    return json_response(p.TenantSelf(tenant_id=principal.tenant).model_dump_json())


@endpoint("create_session")
async def create_session(request: Request) -> Response:
    ctx = context_of(request)
    principal = await principal_of(request)
    principal.require("tenant", "admin")
    body = validate(p.CreateSession, await read_json(request, ctx.settings.max_body_bytes))
    tenant_id = _session_tenant(principal, body.tenant_id)
    if principal.scope == "admin" and not await ctx.store.tenant_exists(tenant_id):
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no tenant {tenant_id}")
    ttl_s = body.ttl_s or ctx.settings.session_ttl_s
    if ttl_s > ctx.settings.max_session_ttl_s:
        raise ApiError(
            422,
            "invalid_body",
            f"ttl_s: at most {ctx.settings.max_session_ttl_s} (RLM_MAX_SESSION_TTL_S)",
        )
    session_id, token, expires_at = await ctx.store.create_session(tenant_id, ttl_s, body.metadata)
    logger.info("session created", extra={"tenant_id": tenant_id, "session_id": session_id})
    created = p.SessionCreated(session_id=session_id, token=token, expires_at=expires_at)
    return json_response(created.model_dump_json(), 201)


def _session_tenant(principal: Principal, requested: str | None) -> str:
    if principal.scope == "admin":
        if requested is None:
            raise ApiError(
                422,
                ErrorCode.INVALID_BODY,
                "tenant_id: an admin token must name the session's tenant",
            )
        return requested
    if requested is not None and requested != principal.tenant:
        raise ApiError(
            403, ErrorCode.FORBIDDEN, "a tenant token opens sessions for its own tenant only"
        )
    return principal.tenant


@endpoint("delete_session")
async def delete_session(request: Request) -> Response:
    ctx = context_of(request)
    principal = await principal_of(request)
    principal.require("tenant", "admin")
    tenant_id = _session_tenant(principal, request.query_params.get("tenant_id"))
    session_id = request.path_params["session_id"]
    if not is_session_id(session_id) or not is_tenant_id(tenant_id):
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no session {session_id}")
    failed, token_hash = await ctx.store.close_session(tenant_id, session_id)
    if token_hash:
        ctx.auth.forget(token_hash)
    logger.info(
        "session closed",
        extra={"tenant_id": tenant_id, "session_id": session_id, "failed": failed},
    )
    return json_response(p.SessionClosed(session_id=session_id, failed_requests=failed))
