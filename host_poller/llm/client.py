"""An `LLMClient` over `openai.AsyncOpenAI` chat completions.

Retries are the SDK's own (`max_retries`, backoff with jitter, Retry-After honoured); this
module adds none. It bounds concurrency, times each call, prices it, and maps the SDK's
errors onto `host_poller.llm.errors` with the API key redacted.

The call goes through the SDK's generic `request` (what its documented `post`, the way to
send a request body as is, calls; `host_poller.llm.sdk`): its auth, retries, timeouts and
error mapping, without the typed layers this client does not need.
`chat.completions.create` walked every message through the SDK's parameter transform
and `parse()` built the whole `ChatCompletion` model: ~20 % of the CPU of a call (py-spy,
docs/performance.md). The answer is read here instead (`host_poller.llm.completion`),
only the fields used, each checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from host_poller.llm.completion import ChatAnswer, read_answer
from host_poller.llm.errors import (
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    LLMStatusError,
    LLMTimeoutError,
)
from host_poller.llm.pricing import cost_usd
from host_poller.llm.profiles import RESERVED_PARAMS, Profile
from host_poller.llm.types import Completion, Message, Usage
from rlm_wire.tracing import child_of
from rlm_wire.transport import tls_context

if TYPE_CHECKING:
    import openai

logger = logging.getLogger(__name__)

# Cap on the connect phase: a dead host should fail fast even with a long read timeout.
_CONNECT_TIMEOUT_S = 10.0
# Without an API key the SDK refuses to start; local servers ignore the header.
_NO_KEY = "no-key"
#: Keyword arguments of the SDK's request methods (not request fields) that `params` may
#: hold, as `openai.RequestOptions` keys: a call's traceparent comes as `extra_headers`.
_SDK_OPTIONS = {
    "extra_headers": "headers",
    "extra_query": "params",
    "extra_body": "extra_json",
    "timeout": "timeout",
}


def _estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


class OpenAIChatClient:
    """Chat completions of one profile's model; at most `profile.concurrency` in flight."""

    def __init__(self, profile: Profile, api_key: SecretStr | None) -> None:
        self.profile = profile
        self.model = profile.model
        self._secret = api_key.get_secret_value() if api_key is not None else None
        self._semaphore = asyncio.Semaphore(profile.concurrency)
        # Imported here, not at module level: the SDK imports every one of its types (~0.7 s),
        # and this module's other names (`traced`) are on paths that build no client.
        import httpx2
        import openai

        from host_poller.llm.sdk import ChatCall, LeanAsyncOpenAI
        from host_poller.llm.transport import LinkClient, LinkTransport, uses_link

        http_client: httpx2.AsyncClient
        if uses_link(profile):
            # The SDK over the project's keep-alive link (host_poller.llm.transport); the
            # choice was made from the proxy variables already, so httpx2 reads none.
            transport = LinkTransport(profile.base_url, max_connections=profile.concurrency)
            http_client = LinkClient(transport)
        else:
            # The SDK's own client, on the process's one TLS context (loading the CA bundle
            # per client cost ~50 ms of start-up each); no more connections than calls in
            # flight (the semaphore), so each request's pool scan stays short.
            http_client = openai.DefaultAsyncHttpxClient(
                verify=tls_context(),
                limits=httpx2.Limits(
                    max_connections=profile.concurrency,
                    max_keepalive_connections=profile.concurrency,
                ),
            )
        self._openai = LeanAsyncOpenAI(
            base_url=profile.base_url,
            api_key=self._secret or _NO_KEY,
            timeout=httpx2.Timeout(
                profile.timeout_s, connect=min(profile.timeout_s, _CONNECT_TIMEOUT_S)
            ),
            max_retries=profile.max_retries,
            http_client=http_client,
        )
        # The SDK's answer as it came, with its attempt count (`retries_taken`).
        self._raw_answer: type[openai.AsyncAPIResponse[object]] = openai.AsyncAPIResponse[object]
        self._sdk_error: type[openai.OpenAIError] = openai.OpenAIError
        self._call = ChatCall("/chat/completions")

    def __repr__(self) -> str:
        return f"OpenAIChatClient(profile={self.profile.name!r}, model={self.model!r})"

    async def complete(
        self, messages: Sequence[Message], *, params: Mapping[str, Any] | None = None
    ) -> Completion:
        """One chat completion; raises an `LLMError` leaf once the SDK's retries are spent.

        `params` (extra request fields) go over the profile's own `params`."""
        extra = {**self.profile.params, **(params or {})}
        profile_headers = self.profile.params.get("extra_headers")
        if params and "extra_headers" in params and isinstance(profile_headers, dict):
            # A call's headers (its traceparent) join the profile's, they do not replace them.
            extra["extra_headers"] = {**profile_headers, **params["extra_headers"]}
        reserved = RESERVED_PARAMS.intersection(extra)
        if reserved:
            raise ValueError(f"params may not set {sorted(reserved)}")
        # What `chat.completions.create(**fields)` sends: the request fields as the body, the
        # SDK's own keywords as its request options.
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        options: dict[str, Any] = {}
        for key, value in extra.items():
            if key in _SDK_OPTIONS:
                options[_SDK_OPTIONS[key]] = value
            else:
                body[key] = value
        async with self._semaphore:
            started = time.perf_counter()
            try:
                raw = await self._openai.request(
                    self._raw_answer, self._call.options(body, options)
                )
                content = await raw.read()
            except self._sdk_error as exc:
                raise self._translate(exc) from exc
            latency = time.perf_counter() - started
        answer = read_answer(content, model=self.model)
        return self._completion(answer, messages, latency, raw.retries_taken + 1)

    def _completion(
        self,
        answer: ChatAnswer,
        messages: Sequence[Message],
        latency: float,
        attempts: int,
    ) -> Completion:
        text = answer.text
        if answer.usage is not None:
            input_tokens, output_tokens = answer.usage
        else:
            # Some servers omit usage; budgets still need a number, so estimate it.
            input_tokens = sum(_estimate_tokens(m.get("content", "")) for m in messages)
            output_tokens = _estimate_tokens(text)
            logger.warning("response without usage, tokens estimated", extra={"model": self.model})
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd(self.model, input_tokens, output_tokens, self.profile),
            calls=1,
        )
        logger.debug(
            "llm call done",
            extra={
                "model": self.model,
                "latency_s": round(latency, 4),
                "attempts": attempts,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
            },
        )
        return Completion(
            text=text,
            model=self.model,  # the requested name: the ledger groups by profile model
            usage=usage,
            latency_s=latency,
            attempts=attempts,
        )

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "[redacted]")
        return text

    def _scrub(self, exc: BaseException) -> None:
        """Redact the key inside the SDK's error too: it is chained, and tracebacks print it."""
        if not self._secret:
            return
        exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(getattr(exc, "message", None), str):
            exc.message = self._redact(exc.message)  # type: ignore[attr-defined]
        if self._secret in repr(getattr(exc, "body", None)):
            exc.body = None  # type: ignore[attr-defined]

    def _translate(self, exc: openai.OpenAIError) -> LLMError:
        import openai

        self._scrub(exc)
        message = self._redact(str(getattr(exc, "message", None) or exc))
        model = self.model
        if isinstance(exc, openai.APITimeoutError):
            return LLMTimeoutError(f"timed out after {self.profile.timeout_s}s", model=model)
        if isinstance(exc, openai.APIConnectionError):
            return LLMConnectionError(f"connection failed: {message}", model=model)
        if isinstance(exc, openai.RateLimitError):
            return LLMRateLimitError(f"rate limited: {message}", model=model)
        if isinstance(exc, openai.APIStatusError):
            return LLMStatusError(message, model=model, status_code=exc.status_code)
        return LLMResponseError(f"bad response: {message}", model=model)

    async def aclose(self) -> None:
        await self._openai.close()


def build_client(profile: Profile) -> OpenAIChatClient:
    """A client for `profile`, its key read now from `profile.api_key_env`."""
    return OpenAIChatClient(profile, profile.api_key())


def traced(params: Mapping[str, Any] | None, traceparent: str | None) -> dict[str, Any] | None:
    """`params` of an LLM call that is a span of `traceparent` (the openai SDK sends
    `extra_headers`): the provider, and any proxy in between, sees the run's trace."""
    if traceparent is None:
        return dict(params) if params is not None else None
    return {**(params or {}), "extra_headers": {"traceparent": child_of(traceparent)}}
