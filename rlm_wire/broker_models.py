"""The broker's wire protocol, version 1: every JSON body that crosses the broker.

Defined once here and imported by the broker, the host poller and the sandbox runtime (the
stdlib-only exec script mirrors it by hand and is tested against the real broker). Every
model refuses unknown fields. docs/protocol.md describes the same protocol in prose.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, model_validator

from rlm_wire.run_info import RunInfo

PROTOCOL_VERSION = 1

#: Statuses of one request as seen by the side that enqueued it.
RequestStatus = Literal["done", "error", "pending"]
#: What `/respond` says of one answer.
RespondStatus = Literal["accepted", "duplicate", "not_found", "forbidden", "invalid"]

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are an error, instances are immutable, and
    numbers are finite (JSON has no NaN or Infinity; `1e400` would parse as one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def exactly_one_of(**types: str) -> dict[str, Any]:
    """The JSON Schema of "exactly one of these fields is set (not null)", for the models
    whose validator says so: the OpenAPI document (`broker.openapi`) then says it too."""
    return {
        "oneOf": [
            {"required": [name], "properties": {name: {"type": json_type}}}
            for name, json_type in types.items()
        ]
    }


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ErrorInfo(WireModel):
    """A machine-readable code and a human-readable message."""

    code: str
    message: str


class ErrorBody(WireModel):
    """The body of every error response: `{"error": {"code", "message"}}`."""

    error: ErrorInfo


class Usage(WireModel):
    """Token usage and cost of the LLM work behind one answer."""

    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cost_usd: float = Field(0.0, ge=0)
    calls: int = Field(0, ge=0)


# --- tenants and sessions -------------------------------------------------------------------


class CreateTenant(WireModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class TenantCreated(WireModel):
    tenant_id: str
    token: str


class TenantSelf(WireModel):
    """`GET /tenants/self`: the tenant a tenant token belongs to."""

    tenant_id: str


class CreateSession(WireModel):
    ttl_s: int | None = Field(
        None, gt=0, description="Token lifetime; at most the broker's RLM_MAX_SESSION_TTL_S."
    )
    tenant_id: str | None = Field(
        None,
        description="Admin only: the tenant to open the session for (a tenant's own token "
        "opens sessions for itself).",
    )
    metadata: RunInfo | None = Field(
        None,
        description="Where the session sits in its RLM run (`rlm_wire.run_info.RunInfo`); "
        "stored by the broker and delivered with every request of the session.",
    )


class SessionCreated(WireModel):
    session_id: str
    token: str
    expires_at: float


class SessionClosed(WireModel):
    """`DELETE /sessions/{id}`: the token is revoked, unanswered requests failed."""

    session_id: str
    status: Literal["closed"] = "closed"
    failed_requests: int = Field(ge=0)


# --- enqueue ------------------------------------------------------------------------------


class LLMRequest(WireModel):
    """One `llm_query`: a prompt or a message list, exactly one of them."""

    model_config = ConfigDict(json_schema_extra=exactly_one_of(prompt="string", messages="array"))

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    model: Identifier | None = None
    depth: int = Field(0, ge=0, le=64)
    params: dict[str, JsonValue] | None = None
    state: dict[str, JsonValue] | None = Field(
        None, description="The caller's shared RLM state, for a sub-RLM (rlm_query) to start from."
    )

    @model_validator(mode="after")
    def _one_of_prompt_or_messages(self) -> LLMRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class EnqueueBatch(WireModel):
    batch: list[LLMRequest] = Field(min_length=1)


class RequestResult(WireModel):
    """One request's outcome: done (with response), error (with error), or still pending."""

    id: str
    status: RequestStatus
    response: str | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
    state: dict[str, JsonValue] | None = None


class BatchResults(WireModel):
    results: list[RequestResult]


# --- pending -----------------------------------------------------------------------------


class PendingRequest(WireModel):
    """A request as a poller receives it, leased to that poller for `lease_s` seconds.

    `lease_s` is a duration, so the poller schedules renewals on its own monotonic clock;
    `lease_expires_at` (the broker's wall clock) is informative only: clocks differ.
    """

    id: str
    session_id: str
    tenant_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    depth: int = 0
    params: dict[str, JsonValue] | None = None
    state: dict[str, JsonValue] | None = None
    metadata: RunInfo | None = None
    attempt: int
    enqueued_at: float
    lease_s: float
    lease_expires_at: float


class PendingBatch(WireModel):
    requests: list[PendingRequest]


class LeaseIds(WireModel):
    """Requests whose leases the caller holds (at most RLM_MAX_RESPOND_BATCH)."""

    ids: list[str] = Field(min_length=1)


class ExtendLeases(LeaseIds):
    """Keep requests leased while their (slow) LLM calls run, so they are not delivered again."""


class LeaseResult(WireModel):
    id: str
    status: Literal["extended", "not_leased", "not_found", "forbidden"]


class LeaseResults(WireModel):
    """`lease_s`: the seconds each `extended` lease now has left (see `PendingRequest`)."""

    results: list[LeaseResult]
    lease_s: float
    lease_expires_at: float


class ReleaseLeases(LeaseIds):
    """Hand back what this poller will not answer (at shutdown), so that the broker delivers
    it again at once rather than when the leases run out: requests by id, and whatever its
    long-polls `polls` still hold (poll ids whose answer never arrived whole, as
    `/pending?abandoned=`: at most RLM_MAX_ABANDONED_POLLS)."""

    ids: list[str] = Field(default_factory=list)
    polls: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_something(self) -> ReleaseLeases:
        if not self.ids and not self.polls:
            raise ValueError("name at least one request id or poll id")
        return self


class ReleaseResult(WireModel):
    id: str
    status: Literal["released", "not_leased", "not_found", "forbidden"]


class ReleaseResults(WireModel):
    """`results`: per id; `from_polls`: how many requests the named polls still held."""

    results: list[ReleaseResult]
    from_polls: int = 0


# --- respond -----------------------------------------------------------------------------


class Answer(WireModel):
    """An answer to one request: a response or an error, exactly one of them."""

    model_config = ConfigDict(json_schema_extra=exactly_one_of(response="string", error="object"))

    id: str
    response: str | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
    state: dict[str, JsonValue] | None = None

    @model_validator(mode="after")
    def _one_of_response_or_error(self) -> Answer:
        if (self.response is None) == (self.error is None):
            raise ValueError("give exactly one of 'response' or 'error'")
        return self


class AnswerBatch(WireModel):
    responses: list[Answer] = Field(min_length=1)


class RespondResult(WireModel):
    id: str
    status: RespondStatus
    message: str | None = None


class RespondResults(WireModel):
    results: list[RespondResult]


# --- health ------------------------------------------------------------------------------


class QueueDepths(WireModel):
    pending: int
    leased: int
    oldest_pending_age_s: float | None


class Liveness(WireModel):
    """`GET /health/live`: the process serves HTTP (Redis is not consulted)."""

    status: Literal["ok"] = "ok"


class Health(WireModel):
    status: Literal["ok", "degraded"]
    version: str
    protocol: int = PROTOCOL_VERSION
    replica_id: str
    redis: dict[str, JsonValue]
    queues: QueueDepths | None = None
    pollers_last_minute: int | None = None
    waiters: int
