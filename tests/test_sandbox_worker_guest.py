"""The guest modules and the blob format, in plain CPython (no sandbox process needed)."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

import rlm_repl
from rlm_wire.runtime_models import ExecutionResult
from sandbox_runtime.errors import SandboxBlobError, SandboxProtocolError
from sandbox_runtime.guest import namespace
from sandbox_runtime.guest import runtime as guest_runtime
from sandbox_runtime.guest.host import PipeTransport
from sandbox_runtime.guest.session import Session
from sandbox_runtime.worker import blob, framing
from sandbox_runtime.worker.models import result_violation


class FakeHost:
    """The host API of `host.mjs`: answers llm_call frames with canned replies."""

    def __init__(self, *replies: dict[str, Any]) -> None:
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []
        self.interrupt_cleared = False

    def call(self, header_json: str) -> str:
        self.calls.append(json.loads(header_json))
        return json.dumps(self.replies.pop(0))

    def reply(self, header_json: str, payload: Any) -> None:
        raise AssertionError("not serving requests here")

    def memory_bytes(self) -> int:
        return 0

    def sleep(self, ms: float) -> bool:
        return False

    def clear_interrupt(self) -> None:
        self.interrupt_cleared = True


@pytest.fixture
def session() -> Iterator[Session]:
    main = sys.modules["__main__"]
    try:
        yield Session(FakeHost(), 2**20)
    finally:
        sys.modules["__main__"] = main


def test_the_pipe_transport_sends_one_frame_per_call_and_reads_the_results() -> None:
    host = FakeHost(
        {
            "results": [
                {"response": "a!", "state": {"k": 1}},
                {"error": {"code": "x", "message": "m"}},
            ]
        }
    )
    results = PipeTransport(host).send(
        [
            {"depth": 1, "params": {"kind": "rlm"}, "prompt": "a", "model": "m", "state": {}},
            {"depth": 1, "params": {"kind": "rlm"}, "messages": [{"role": "user", "content": "b"}]},
        ]
    )
    assert host.calls == [
        {
            "op": "llm_call",
            "call": {
                "kind": "rlm",
                "prompts": ["a", [{"role": "user", "content": "b"}]],
                "model": "m",
                "batched": True,
                "state": {},
            },
        }
    ]
    assert results == [
        {"status": "done", "response": "a!", "state": {"k": 1}},
        {"status": "error", "error": {"code": "x", "message": "m"}},
    ]


def test_an_interrupted_call_raises_keyboard_interrupt() -> None:
    host = FakeHost({"interrupted": True})
    with pytest.raises(KeyboardInterrupt):
        PipeTransport(host).send([{"depth": 1, "params": {"kind": "llm"}, "prompt": "a"}])
    assert host.interrupt_cleared


def test_a_reply_with_the_wrong_count_is_an_llm_query_error() -> None:
    host = FakeHost({"results": []})
    with pytest.raises(rlm_repl.LLMQueryError) as caught:
        PipeTransport(host).send([{"depth": 1, "params": {"kind": "llm"}, "prompt": "a"}])
    assert caught.value.code == "bad_reply"


def test_the_session_runs_the_one_repl(session: Session) -> None:
    assert session.ns["llm_query"].__self__ is session.repl
    assert sys.modules["__main__"] is session.module
    result = session.repl.execute("x = 2\nx * 21")
    assert (result["stdout"], result["error"]) == ("42\n", None)


def test_namespace_round_trip_in_cpython(session: Session) -> None:
    source = (
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
        "def unbox(b):\n    return b.v\nbox = Box(5)\nitems = [box, box]\nf = lambda: 0\n"
        "state['kept'] = 1\n"
    )
    assert session.repl.execute(source)["error"] is None
    session.record_definitions(source)
    raw, skipped = namespace.dump(session)
    assert skipped == ["f"]
    session.repl.reset()
    assert "box" not in session.ns
    assert namespace.load(session, raw) == ["f"]
    restored = session.ns
    assert restored["unbox"](restored["items"][1]) == 5
    assert restored["items"][0] is restored["items"][1]
    assert isinstance(restored["box"], restored["Box"])
    assert session.repl.snapshot_state() == {"kept": 1}
    assert session.repl.cells == 1


def test_blob_rejects_foreign_truncated_and_oversized_input() -> None:
    packed = blob.pack(b"payload" * 100, 6)
    assert blob.unpack(packed, 2**20) == b"payload" * 100
    with pytest.raises(SandboxBlobError):
        blob.unpack(b"not a blob", 2**20)
    with pytest.raises(SandboxBlobError):
        blob.unpack(packed[:-5], 2**20)
    bomb = blob.MAGIC + zlib.compress(b"\0" * (4 * 2**20))
    with pytest.raises(SandboxBlobError):
        blob.unpack(bomb, 2**20)


# --- bounds of what a sandbox sends back -------------------------------------------------------


class RecordingHost(FakeHost):
    """Keeps the reply frames the guest sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []

    def reply(self, header_json: str, payload: Any) -> None:
        self.sent.append(json.loads(header_json))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingHost]:
    """`runtime.dispatch` serving a session of its own (without `install`'s global patches)."""
    host = RecordingHost()
    main = sys.modules["__main__"]
    monkeypatch.setattr(guest_runtime, "_session", Session(host, 2**20))
    try:
        yield host
    finally:
        sys.modules["__main__"] = main


def _execute(host: RecordingHost, code: str, output_bytes: int = 1024) -> dict[str, Any]:
    header = {"op": "execute", "code": code, "output_bytes": output_bytes}
    guest_runtime.dispatch(json.dumps(header), None)
    return host.sent.pop()


def test_the_guest_refuses_a_final_answer_over_the_output_limit(served: RecordingHost) -> None:
    reply = _execute(served, 'FINAL("é" * 600)')  # 1200 bytes in UTF-8, 600 characters
    assert reply["final"] is None
    assert reply["error"]["type"] == "OutputTooLarge"
    assert "1200 bytes" in reply["error"]["message"]
    assert _execute(served, 'FINAL("é" * 500)')["final"]["value"] == "é" * 500


def test_the_guest_bounds_error_type_names(served: RecordingHost) -> None:
    reply = _execute(served, 'raise type("E" * 5000, (Exception,), {})("boom")')
    assert reply["error"]["type"] == "E" * guest_runtime.MAX_ERROR_TYPE_CHARS + "..."


def test_a_reply_over_the_frame_ceiling_becomes_an_error(
    served: RecordingHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_runtime, "MAX_REPLY_BYTES", 4096)
    reply = _execute(served, "state['big'] = 'x' * 8000", output_bytes=2**20)
    assert reply["op"] == "error" and reply["type"] == "ResultTooLarge"


def test_the_guest_and_the_supervisor_agree_on_the_frame_ceiling() -> None:
    # host.mjs adds `,"seq":N` to each reply: the largest the guest sends, stamped, still fits
    stamp = len(',"seq":-2147483648')
    assert guest_runtime.MAX_REPLY_BYTES + stamp <= framing.MAX_HEADER_BYTES
    assert guest_runtime.MAX_REPLY_BYTES >= framing.MAX_HEADER_BYTES - 64


@pytest.mark.anyio
async def test_an_oversized_frame_is_refused_on_its_prefix() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">II", framing.MAX_HEADER_BYTES + 1, 0))  # and nothing more
    with pytest.raises(SandboxProtocolError, match="header of"):
        await asyncio.wait_for(framing.read_frame(reader, 2**30), 5)
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">II", 2, 2**20 + 1))
    with pytest.raises(SandboxProtocolError, match="payload of"):
        await asyncio.wait_for(framing.read_frame(reader, 2**20), 5)


def test_a_blob_is_measured_without_inflating_it_whole() -> None:
    bomb = blob.MAGIC + zlib.compress(bytes(64 * 2**20), 9)
    assert blob.inflated_size(bomb, 8 * 2**20) is None
    assert blob.inflated_size(bomb, 64 * 2**20) == 64 * 2**20
    small = blob.pack(b"abc" * 1000, 6)
    assert blob.inflated_size(small, 2**20) == 3000
    for bad in (b"other", small[:-4], blob.MAGIC + b"not zlib"):
        with pytest.raises(SandboxBlobError):
            blob.inflated_size(bad, 2**20)


def _result(**fields: Any) -> ExecutionResult:
    base: dict[str, Any] = {"stdout": "", "stderr": "", "duration_ms": 1.0, "memory_bytes": 0}
    return ExecutionResult.model_validate({**base, **fields})


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"stdout": "x" * 5000}, "stdout of 5000"),
        ({"final": {"value": "x" * 1025, "source": "FINAL"}}, "FINAL value of 1025"),
        ({"final": {"value": 5}}, "without a text value"),
        ({"final": {"value": "ok", "name": "n" * 5000}}, "FINAL fields"),
        ({"state": {"k": "x" * 2000}}, "state of 2009 bytes"),
    ],
)
def test_a_result_over_its_bounds_is_named(fields: dict[str, Any], says: str) -> None:
    violation = result_violation(_result(**fields), output_bytes=1024, state_bytes=2000)
    assert violation is not None and says in violation


def test_a_result_within_its_bounds_passes() -> None:
    within = _result(stdout="x" * 1024, final={"value": "x" * 1024, "source": "FINAL"})
    assert result_violation(within, output_bytes=1024, state_bytes=2000) is None
