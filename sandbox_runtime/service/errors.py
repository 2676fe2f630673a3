"""Errors of the runtime service (`rlm sandbox`) and of its HTTP client.

    ServiceError                      root of the service's errors (a `SandboxError`)
    ├── ApiError                      answered as `{"error": {"code", "message"}}` + status
    │   ├── BadRequest (400)          malformed JSON or a bad value
    │   ├── Unauthorized (401)        missing or wrong bearer token
    │   ├── NotFound (404)            unknown (or ended) session
    │   ├── PayloadTooLarge (413)     a body over the configured limit
    │   ├── ValidationFailed (422)    a body that does not fit `sandbox_runtime.protocol`
    │   ├── TooManySessions (429)     the configured `max_sessions` are live or hibernated
    │   └── Unavailable (503)         no sandbox could be started (or the service is stopping)
    └── RuntimeClientError            raised by `sandbox_runtime.client.RuntimeClient`
        ├── RuntimeUnreachable        connection failed or timed out
        └── RuntimeResponseError      the runtime answered with an error body (.status, .code)

Route handlers raise `ApiError`s; `sandbox_runtime.service.app` turns them into responses.
"""

from __future__ import annotations

from sandbox_runtime.errors import SandboxError


class ServiceError(SandboxError):
    """Root of the runtime service's exceptions."""


class ApiError(ServiceError):
    """An error the API answers with; `status` and `code` go on the wire."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class ValidationFailed(ApiError):
    status, code = 422, "invalid_body"


class TooManySessions(ApiError):
    status, code = 429, "too_many_sessions"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class RuntimeClientError(ServiceError):
    """Root of the errors `RuntimeClient` raises."""


class RuntimeUnreachable(RuntimeClientError):
    """The runtime could not be reached (connection refused, reset, or timed out)."""


class RuntimeResponseError(RuntimeClientError):
    """The runtime answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
