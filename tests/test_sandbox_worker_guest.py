"""The guest modules and the blob format, in plain CPython (no sandbox process needed)."""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

import rlm_repl
from sandbox_runtime.errors import SandboxBlobError
from sandbox_runtime.guest import namespace
from sandbox_runtime.guest.host import PipeTransport
from sandbox_runtime.guest.session import Session
from sandbox_runtime.worker import blob


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
