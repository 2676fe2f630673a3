"""HTTP plumbing shared by rlm-broker's Starlette services and their clients.

- `rlm_http.errors`: the API error tree (`HttpApiError` and its status leaves) and the two
  errors of a client (`ServiceUnreachable`, `ServiceResponseError`); each component
  subclasses them under its own root.
- `rlm_http.responses`: JSON answers and the one table from exceptions to error answers.
- `rlm_http.bodies`: request bodies with a streaming size limit, JSON, model validation
  (422 naming each field), query values.
- `rlm_http.serving`: uvicorn's config, and serving on a thread or in the running loop.
- `rlm_http.client`: `ApiClient`, the base of the typed API clients.
"""

from rlm_http.client import ApiClient
from rlm_http.errors import (
    BadRequest,
    Forbidden,
    HttpApiError,
    HttpError,
    NotFound,
    PayloadTooLarge,
    ServiceResponseError,
    ServiceUnreachable,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from rlm_http.responses import error_response, exception_handlers, json_response
from rlm_http.serving import LoopServer, ThreadedServer, uvicorn_config

__all__ = [
    "ApiClient",
    "BadRequest",
    "Forbidden",
    "HttpApiError",
    "HttpError",
    "LoopServer",
    "NotFound",
    "PayloadTooLarge",
    "ServiceResponseError",
    "ServiceUnreachable",
    "ThreadedServer",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "error_response",
    "exception_handlers",
    "json_response",
    "uvicorn_config",
]
