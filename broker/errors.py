"""The broker package's exception tree.

    BrokerError                     root of everything raised by `broker`
    ├── ApiError                    an error the HTTP API answers with: status + code + message
    │   ├── BadRequest (400)        malformed JSON, bad query values
    │   ├── ValidationFailed (422)  a body that does not fit the protocol
    │   ├── Unauthorized (401)      missing, unknown, revoked or expired token
    │   ├── Forbidden (403)         a token of the wrong scope or tenant
    │   ├── NotFound (404)
    │   ├── PayloadTooLarge (413)
    │   ├── TooManyRequests (429)   a configured limit (open requests per session)
    │   └── Unavailable (503)       Redis unreachable
    └── ClientError                 raised by `broker.client.BrokerClient`
        ├── BrokerUnreachable       connection failed or timed out (after retries)
        └── BrokerResponseError     the broker answered with an error body (.status, .code)

Handlers raise `ApiError`s; `broker.app` maps them to `{"error": {"code", "message"}}` with
the status. The client maps the same bodies back to `BrokerResponseError`.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of the broker package's exceptions."""


class ApiError(BrokerError):
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


class ValidationFailed(ApiError):
    status, code = 422, "invalid_body"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class ClientError(BrokerError):
    """Root of the errors `BrokerClient` raises."""


class BrokerUnreachable(ClientError):
    """The broker could not be reached (connection refused, reset, or timed out)."""


class BrokerResponseError(ClientError):
    """The broker answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
