"""Turning a failure into an error `Answer`: the code table of the poller.

The enqueuer sees `status: "error"` with one of these codes (the sandbox raises
`LLMQueryError` from it); never an error string posing as a response.
"""

from __future__ import annotations

from host_poller.llm.errors import (
    LLMConfigError,
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    LLMStatusError,
    LLMTimeoutError,
)
from host_poller.poller.errors import RequestFailed
from rlm_wire.broker_models import Answer, ErrorInfo
from rlm_wire.codes import ErrorCode

#: Error code of each LLM failure, most specific class first.
LLM_ERROR_CODES: tuple[tuple[type[LLMError], str], ...] = (
    (LLMRateLimitError, ErrorCode.LLM_RATE_LIMITED),
    (LLMTimeoutError, ErrorCode.LLM_TIMEOUT),
    (LLMConnectionError, ErrorCode.LLM_UNREACHABLE),
    (LLMStatusError, ErrorCode.LLM_HTTP_ERROR),
    (LLMResponseError, ErrorCode.LLM_BAD_RESPONSE),
    (LLMConfigError, ErrorCode.LLM_CONFIG),
    (LLMError, "llm_error"),
)
INTERNAL_ERROR = ErrorCode.INTERNAL_ERROR


def error_code(exc: BaseException) -> str:
    """The wire code of `exc`."""
    if isinstance(exc, RequestFailed):
        return exc.code
    for cls, code in LLM_ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return INTERNAL_ERROR


def error_message(exc: BaseException) -> str:
    """A message safe to send: LLM errors are already redacted; others name their type only."""
    if isinstance(exc, (RequestFailed, LLMError)):
        return str(exc)
    return f"the poller failed to answer ({type(exc).__name__}); see its logs"


def error_answer(request_id: str, exc: BaseException) -> Answer:
    """The error Answer for a request that failed with `exc`."""
    return Answer(id=request_id, error=ErrorInfo(code=error_code(exc), message=error_message(exc)))
