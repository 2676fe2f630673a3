"""W3C trace context through a run: one trace from the root's calls to every sub-call and
sub-RLM, carried by the broker in the sessions' RunInfo and sent to the provider as the
`traceparent` header (seen here by the scripted LLM, over real HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest
from pydantic import ValidationError

from host_poller.rlm import read_trajectory
from rlm_wire.run_info import RunInfo
from rlm_wire.tracing import child_of, is_valid, new_traceparent, trace_id
from tests.support.runs import scripted_stack

pytestmark = pytest.mark.anyio

ROOT = "You are the root of a Recursive Language Model"
CHILD = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"
SCENARIO: dict[str, Any] = {
    "name": "traced",
    "rules": [
        {
            "name": "child",
            "match": {"system": CHILD, "iteration": 0},
            "reply": {"kind": "code", "code": ["FINAL('child:' + llm_query('inner'))"]},
        },
        {
            "name": "root-work",
            "match": {"system": ROOT, "iteration": 0},
            "reply": {
                "kind": "code",
                "code": [
                    "parts = llm_query_batched(['one', 'two'])",
                    "child = rlm_query('go deeper')",
                ],
            },
        },
        {
            "name": "root-final",
            "match": {"system": ROOT, "min_iteration": 1},
            "reply": {"kind": "code", "code": ["FINAL(child + '/' + '+'.join(parts))"]},
        },
        {"name": "sub", "match": {}, "reply": {"kind": "text", "text": "w"}},
    ],
}


def test_a_child_span_keeps_the_trace_and_its_flags() -> None:
    parent = new_traceparent()
    assert is_valid(parent) and parent.endswith("-01")
    child = child_of(parent)
    assert trace_id(child) == trace_id(parent)
    assert child.split("-")[2] != parent.split("-")[2]
    unsampled = parent[:-2] + "00"
    assert child_of(unsampled).endswith("-00")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "garbage",
        "01-" + "a" * 32 + "-" + "b" * 16 + "-01",  # an unknown version
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",  # the all-zero trace id is invalid
        "00-" + "a" * 32 + "-" + "0" * 16 + "-01",
    ],
)
def test_no_usable_parent_starts_a_new_trace(header: str | None) -> None:
    started = child_of(header)
    assert is_valid(started)
    if header is not None and header.count("-") == 3:
        assert trace_id(started) != header.split("-")[1]


def test_session_metadata_carries_only_a_well_formed_traceparent() -> None:
    header = new_traceparent()
    assert RunInfo(traceparent=header).traceparent == header
    for hostile in ["00-" + "A" * 32 + "-" + "b" * 16 + "-01", "x" * 5000, header + "\r\nX: y"]:
        with pytest.raises(ValidationError):
            RunInfo(traceparent=hostile)


async def _run(redis_url: str, tmp_path: Path, traceparent: str | None) -> tuple[Any, list[Any]]:
    async with scripted_stack(redis_url, tmp_path, SCENARIO) as run:
        result = await run.rlm().acompletion("ctx", "Trace me", traceparent=traceparent)
        stats = httpx2.get(f"{run.llm_url}/_fake/stats", timeout=10)
    return result, stats.json()["traceparents"]


@pytest.mark.parametrize("given", [False, True], ids=["new-trace", "caller-trace"])
async def test_every_llm_call_of_a_run_is_a_span_of_one_trace(
    redis_url: str, tmp_path: Path, given: bool
) -> None:
    caller = new_traceparent() if given else None
    result, seen = await _run(redis_url, tmp_path, caller)
    assert result.answer == "child:w/w+w"
    # root x2, two batched sub-calls, the sub-RLM's root, its own sub-call: 6 LLM calls.
    assert len(seen) == 6, seen
    headers = [header for _, header in seen]
    assert all(header is not None and is_valid(header) for header in headers), headers
    traces = {trace_id(header) for header in headers if header is not None}
    assert len(traces) == 1, "one trace for the whole run, every depth"
    spans = [header.split("-")[2] for header in headers if header is not None]
    assert len(set(spans)) == len(spans), "each LLM call is a span of its own"
    [trace] = traces
    if caller is not None:
        assert trace == trace_id(caller), "the run continues the caller's trace"
    assert result.trajectory_path is not None
    start = next(e for e in read_trajectory(result.trajectory_path) if e["event"] == "run_start")
    assert start["trace_id"] == trace
