"""Every error code that crosses rlm-broker's wire, defined once.

Two families share the one table:
- API codes: the `code` of an HTTP error body `{"error": {"code", "message"}}` (an `ApiError`).
- Answer codes: the `code` of a request's error result (`status: "error"`), which sandboxed
  code receives as `LLMQueryError.code` from `llm_query` / `llm_query_batched` / `rlm_query`.
`ErrorCode` is a `StrEnum`: members are plain strings on the wire and in comparisons.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # --- API codes (HTTP error bodies) -----------------------------------------------------
    BAD_REQUEST = "bad_request"
    """400: malformed JSON, a bad query value or header."""
    UNAUTHORIZED = "unauthorized"
    """401: a missing, unknown, revoked or expired token."""
    FORBIDDEN = "forbidden"
    """403: a token of the wrong scope or tenant."""
    NOT_FOUND = "not_found"
    """404: unknown (or expired) tenant, session or request; unknown route."""
    METHOD_NOT_ALLOWED = "method_not_allowed"
    """405."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    """413: a body or batch over its configured limit."""
    INVALID_BODY = "invalid_body"
    """422: a body that does not fit the endpoint's model."""
    TOO_MANY_REQUESTS = "too_many_requests"
    """429: a configured per-session or per-tenant limit."""
    TOO_MANY_SESSIONS = "too_many_sessions"
    """429: the sandbox runtime's sessions are all taken."""
    BAD_SNAPSHOT = "bad_snapshot"
    """400: a sandbox hibernation blob or state snapshot that cannot be read."""
    UNAVAILABLE = "unavailable"
    """503: a dependency (Redis, a sandbox) is down; retry."""
    HTTP_ERROR = "http_error"
    """Any other HTTP status Starlette raised itself."""
    INTERNAL_ERROR = "internal_error"
    """500 (logged), or an answer that failed for an unexpected reason."""

    # --- answer codes (what `llm_query` raises in sandboxed code) ------------------------
    REQUEST_FAILED = "request_failed"
    """The poller could not answer the request (generic)."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """The run's token, cost, sub-call or time budget (or a depth cap) is spent."""
    SUB_RLM_FAILED = "sub_rlm_failed"
    """An `rlm_query` child run failed."""
    SUB_RLM_UNAVAILABLE = "sub_rlm_unavailable"
    """This poller does not run sub-RLMs in the environment asked for."""
    MAX_DEPTH = "max_depth"
    """`rlm_query` at the run's max_depth."""
    LLM_RATE_LIMITED = "llm_rate_limited"
    LLM_TIMEOUT = "llm_timeout"
    LLM_UNREACHABLE = "llm_unreachable"
    LLM_HTTP_ERROR = "llm_http_error"
    LLM_BAD_RESPONSE = "llm_bad_response"
    LLM_CONFIG = "llm_config"
    LLM_ERROR = "llm_error"
    """The LLM provider failed (after the SDK's own retries); most specific first above."""
    ANSWER_TOO_LARGE = "answer_too_large"
    """The answer is over the broker's size limit."""
    UNDELIVERABLE = "undeliverable"
    """No poller finished the request within RLM_MAX_ATTEMPTS leases."""
    SESSION_CLOSED = "session_closed"
    """The session was closed while the request waited."""
    NO_BROKER = "no_broker"
    """The sandbox has no broker to reach (no session was given to it)."""
    INVALID_REQUEST = "invalid_request"
    """The sandbox's call did not fit the wire model (checked before it left)."""
    BROKER_UNREACHABLE = "broker_unreachable"
    """The broker could not be reached within the retry deadline."""
    UNEXPECTED_BODY = "unexpected_body"
    """The broker answered with a body that does not fit the protocol."""
    EMPTY_ANSWER = "empty_answer"
    """The request ended without a response or an error."""
