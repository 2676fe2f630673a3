"""The one exception tree of rlm-broker's HTTP APIs, for servers and clients alike.

    WireError                   root of everything raised by `rlm_wire`
    ├── ApiError                a server's error answer: `status` + `code` + `message`, sent
    │                           as `{"error": {"code", "message"}}` (in the manner of
    │                           Starlette's `HTTPException`: the status is data, not a class)
    ├── ServiceUnreachable      a client could not reach the service (after its retries)
    └── ServiceResponseError    the service answered with an error body (.status, .code)

Every code a service may answer with is listed once, in `rlm_wire.codes`.
"""

from __future__ import annotations

from collections.abc import Mapping


class WireError(Exception):
    """Root of the exceptions of `rlm_wire`."""


class ApiError(WireError):
    """An error an API answers with; `status`, `code` and `message` go on the wire."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


class ServiceUnreachable(WireError):
    """The service could not be reached (connection refused, reset, or timed out).

    `sent` is False only when the request surely never reached the service (no connection
    was made): a caller that must know whether the service may have acted on it (a
    `/pending` that may have leased work) reads it.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ServiceResponseError(WireError):
    """The service answered with an error body; `headers` holds the answer's `Retry-After`
    (and content type) when it had one."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
