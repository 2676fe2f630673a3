"""W3C trace context for one RLM run: one trace id from the root's first LLM call to the last
sub-call at any depth.

A run starts a trace (`new_traceparent`); its broker sessions carry the run's `traceparent`
in their `RunInfo`, so the broker delivers it with every request of the run; each LLM call
(the root's, and each poller's sub-call or sub-RLM) sends a child of it (`child_of`: the
same trace id, a span id of its own) as the `traceparent` header to the provider, and the
trajectory records the trace id. One `llm_query` can then be followed from the sandbox to
the provider in any tracing system that reads W3C trace context.
"""

from __future__ import annotations

import re
import secrets

#: `version-traceid-parentid-flags`, version 00 (https://www.w3.org/TR/trace-context/).
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def new_traceparent() -> str:
    """A new trace, sampled, with a new span id."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_of(traceparent: str | None) -> str:
    """A span of `traceparent`'s trace (its flags kept); a new trace when there is none or it
    is not a valid version-00 header (all-zero ids are invalid, as the spec says)."""
    if traceparent is None or not is_valid(traceparent):
        return new_traceparent()
    _, trace, _, flags = traceparent.split("-")
    return f"00-{trace}-{secrets.token_hex(8)}-{flags}"


def trace_id(traceparent: str) -> str:
    """The trace id of a valid header."""
    return traceparent.split("-")[1]


def is_valid(traceparent: str) -> bool:
    if not _TRACEPARENT.match(traceparent):
        return False
    _, trace, span, _ = traceparent.split("-")
    return trace != _ZERO_TRACE and span != _ZERO_SPAN
