"""The openai SDK's client as `OpenAIChatClient` drives it: what the SDK would build again
on every call, built once.

A call through `AsyncOpenAI.post` makes a `FinalRequestOptions` (a pydantic
`model_construct`, which deep-copies every field's default), then, in `_build_request`,
parses the path and joins it to the base URL (two URL parses). Both give the same result
on every call of a client:

- `ChatCall.options()` copies options made once for the endpoint and adds the call's body
  and request options. The SDK copies options itself before each attempt and never changes
  them in place. The call then goes to `AsyncOpenAI.request`, the method `post` calls with
  its options, so the SDK's auth, retries, timeouts and error mapping stay the same.
- `LeanAsyncOpenAI._prepare_url` keeps the URL it made for a path until the base URL
  changes (httpx2 URLs are immutable).

`FinalRequestOptions` and `_prepare_url` are the SDK's internals (`openai._models`,
`BaseClient`), pinned by uv.lock; `tests/test_llm_sdk.py` checks that the SDK still calls
them, so an SDK that moves them fails there.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import httpx2
import openai
from openai._models import FinalRequestOptions

from host_poller.llm.transport import UrlCache


class LeanAsyncOpenAI(openai.AsyncOpenAI):
    """`openai.AsyncOpenAI` that joins a path to its base URL once."""

    @functools.cached_property
    def urls(self) -> UrlCache:
        """The URLs made for paths (a cached property: the SDK's `copy()` builds its copy
        through `__init__`, which this class leaves as it is)."""
        return UrlCache()

    def _prepare_url(self, url: str) -> httpx2.URL:
        return self.urls.get(url, self.base_url, super()._prepare_url)


class ChatCall:
    """The options of `POST path` calls, made once: `options()` adds a call's own."""

    def __init__(self, path: str) -> None:
        # What `post(path, body=..., options=...)` constructs, less the call's own fields.
        self._template = FinalRequestOptions.construct(
            method="post", url=path, content=None, files=None
        )

    def options(
        self, body: Mapping[str, Any], sdk_options: Mapping[str, Any]
    ) -> FinalRequestOptions:
        """The `FinalRequestOptions` of one call: `body` as its JSON, `sdk_options` as
        `openai.RequestOptions` (headers, params, extra_json, timeout)."""
        return self._template.model_copy(update={"json_data": body, **sdk_options})
