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

Each class here is also its namesake in `rlm_http.errors` (`ApiError` is an
`rlm_http.HttpApiError`), which holds the status codes and the shared behaviour. Handlers
raise `ApiError`s; the request-body and query readers of `rlm_http.bodies` raise
`rlm_http`'s own classes. `broker.handling` maps both to `{"error": {"code", "message"}}`
with the status; the client maps the same bodies back to `BrokerResponseError`.
"""

from __future__ import annotations

from rlm_http import errors as http


class BrokerError(Exception):
    """Root of the broker package's exceptions."""


class ApiError(BrokerError, http.HttpApiError):
    """An error the API answers with; `status` and `code` go on the wire."""


class BadRequest(ApiError, http.BadRequest):
    pass


class ValidationFailed(ApiError, http.ValidationFailed):
    pass


class Unauthorized(ApiError, http.Unauthorized):
    pass


class Forbidden(ApiError, http.Forbidden):
    pass


class NotFound(ApiError, http.NotFound):
    pass


class PayloadTooLarge(ApiError, http.PayloadTooLarge):
    pass


class TooManyRequests(ApiError, http.TooManyRequests):
    pass


class Unavailable(ApiError, http.Unavailable):
    pass


class ClientError(BrokerError):
    """Root of the errors `BrokerClient` raises."""


class BrokerUnreachable(ClientError, http.ServiceUnreachable):
    """The broker could not be reached (connection refused, reset, or timed out)."""


class BrokerResponseError(ClientError, http.ServiceResponseError):
    """The broker answered with an error body (`.status`, `.code`, `.message`)."""
