"""The errors of the LLM clients: one root, one leaf per way a call can fail.

    LLMError                   root; fields `model` and `message`
    ├── LLMConfigError         a profile cannot be used (unknown name, missing key variable)
    ├── LLMRateLimitError      429 after the SDK's retries were spent
    ├── LLMTimeoutError        no answer within the profile's timeout, retries spent
    ├── LLMConnectionError     the endpoint could not be reached, retries spent
    ├── LLMStatusError         any other HTTP error status; field `status_code`
    └── LLMResponseError       a 2xx answer that is malformed or empty

The openai SDK's error is chained (`raise ... from exc`). Messages never carry the API key:
the client redacts it before building the error.
"""

from __future__ import annotations


class LLMError(Exception):
    """A completion could not be obtained from `model`."""

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.message = message
        self.model = model

    def __str__(self) -> str:
        return f"{self.message} (model={self.model})"


class LLMConfigError(LLMError):
    """A profile is unknown or cannot be turned into a client."""


class LLMRateLimitError(LLMError):
    """The provider kept answering 429 Too Many Requests."""


class LLMTimeoutError(LLMError):
    """The provider did not answer within the timeout."""


class LLMConnectionError(LLMError):
    """The provider could not be reached."""


class LLMStatusError(LLMError):
    """The provider answered an HTTP error status other than 429."""

    def __init__(self, message: str, *, model: str, status_code: int) -> None:
        super().__init__(message, model=model)
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.message} (model={self.model}, status={self.status_code})"


class LLMResponseError(LLMError):
    """The provider answered 2xx with a malformed or empty completion."""
