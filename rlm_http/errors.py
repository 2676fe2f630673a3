"""The HTTP errors both services answer with, and the two a client of them raises.

    HttpError                       root of everything raised by `rlm_http`
    ├── HttpApiError                answered as `{"error": {"code", "message"}}` + `status`
    │   ├── BadRequest (400)        malformed JSON, a bad query value
    │   ├── Unauthorized (401)
    │   ├── Forbidden (403)
    │   ├── NotFound (404)
    │   ├── PayloadTooLarge (413)   a body over the endpoint's limit
    │   ├── ValidationFailed (422)  a body that does not fit the endpoint's model
    │   ├── TooManyRequests (429)   a configured limit
    │   └── Unavailable (503)
    ├── ServiceUnreachable          a client could not reach the service (after its retries)
    └── ServiceResponseError        the service answered with an error body (.status, .code)

Each component keeps its own exception root: `broker.errors` and
`sandbox_runtime.service.errors` subclass these (`class NotFound(ApiError, http.NotFound)`),
so `except BrokerError` catches the broker's and `except http.NotFound` catches any 404.
The body readers of `rlm_http.bodies` raise the classes of this module directly.
"""

from __future__ import annotations


class HttpError(Exception):
    """Root of the exceptions of `rlm_http`."""


class HttpApiError(HttpError):
    """An error an API answers with; `status` and `code` go on the wire, with `message`."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(HttpApiError):
    status, code = 400, "bad_request"


class Unauthorized(HttpApiError):
    status, code = 401, "unauthorized"


class Forbidden(HttpApiError):
    status, code = 403, "forbidden"


class NotFound(HttpApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(HttpApiError):
    status, code = 413, "payload_too_large"


class ValidationFailed(HttpApiError):
    status, code = 422, "invalid_body"


class TooManyRequests(HttpApiError):
    status, code = 429, "too_many_requests"


class Unavailable(HttpApiError):
    status, code = 503, "unavailable"


class ServiceUnreachable(HttpError):
    """The service could not be reached (connection refused, reset, or timed out)."""


class ServiceResponseError(HttpError):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
