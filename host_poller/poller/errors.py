"""The poller's exceptions.

    PollerError                 root of everything raised by `host_poller.poller`
    ├── PollerConfigError       the poller cannot start (no token, bad settings)
    ├── BrokerRejected          the broker refused the poller's token (401/403): fatal
    └── RequestFailed           one request cannot be answered; becomes an error Answer
        ├── BudgetExceeded      the run's depth/iteration/call/token/cost budget is spent
        └── SubRLMFailed        the sub-RLM answering an `rlm_query` failed

`RequestFailed.code` is the error code posted to the broker (and raised in the sandbox as
`LLMQueryError`); LLM client errors map to codes in `host_poller.poller.answers`.
"""

from __future__ import annotations

from rlm_wire.codes import ErrorCode


class PollerError(Exception):
    """Root of the poller's exceptions."""


class PollerConfigError(PollerError):
    """The poller's configuration is unusable."""


class BrokerRejected(PollerError):
    """The broker answered 401/403 to the poller: its token is wrong, revoked or of a bad scope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"broker rejected the poller's token ({status}): {message}")
        self.status = status


class RequestFailed(PollerError):
    """One request failed; `code` and `message` go on the wire as the answer's error."""

    code: str = ErrorCode.REQUEST_FAILED

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BudgetExceeded(RequestFailed):
    """A budget of the request's run is spent; the request is refused, not answered."""

    code = ErrorCode.BUDGET_EXCEEDED


class SubRLMFailed(RequestFailed):
    """The sub-RLM answering an `rlm_query` ended in an error."""

    code = ErrorCode.SUB_RLM_FAILED
