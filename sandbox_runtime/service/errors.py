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

Each class here is also its namesake in `rlm_http.errors` (`ApiError` is an
`rlm_http.HttpApiError`, `TooManySessions` an `rlm_http.TooManyRequests`), which holds the
status codes and the shared behaviour. Route handlers raise `ApiError`s; the body readers of
`rlm_http.bodies` raise `rlm_http`'s own classes; `sandbox_runtime.service.app` turns both
into responses.
"""

from __future__ import annotations

from rlm_http import errors as http
from sandbox_runtime.errors import SandboxError


class ServiceError(SandboxError):
    """Root of the runtime service's exceptions."""


class ApiError(ServiceError, http.HttpApiError):
    """An error the API answers with; `status` and `code` go on the wire."""


class BadRequest(ApiError, http.BadRequest):
    pass


class Unauthorized(ApiError, http.Unauthorized):
    pass


class NotFound(ApiError, http.NotFound):
    pass


class PayloadTooLarge(ApiError, http.PayloadTooLarge):
    pass


class ValidationFailed(ApiError, http.ValidationFailed):
    pass


class TooManySessions(ApiError, http.TooManyRequests):
    code = "too_many_sessions"


class Unavailable(ApiError, http.Unavailable):
    pass


class RuntimeClientError(ServiceError):
    """Root of the errors `RuntimeClient` raises."""


class RuntimeUnreachable(RuntimeClientError, http.ServiceUnreachable):
    """The runtime could not be reached (connection refused, reset, or timed out)."""


class RuntimeResponseError(RuntimeClientError, http.ServiceResponseError):
    """The runtime answered with an error body (`.status`, `.code`, `.message`)."""
