"""The guest modules and the blob format, in plain CPython (no sandbox process needed)."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator

import pytest

from sandbox_runtime.errors import SandboxBlobError
from sandbox_runtime.guest import namespace
from sandbox_runtime.guest.cells import run_cell
from sandbox_runtime.guest.errors import LLMQueryError
from sandbox_runtime.guest.output import CappedWriter
from sandbox_runtime.guest.session import Session
from sandbox_runtime.worker import blob


@pytest.fixture
def session() -> Iterator[Session]:
    main = sys.modules["__main__"]
    try:
        yield Session(None, 2**20)
    finally:
        sys.modules["__main__"] = main


def test_capped_writer_keeps_the_head_and_marks_the_rest() -> None:
    writer = CappedWriter(10)
    writer.write("héllo ")
    writer.write("world and more")
    text = writer.getvalue()
    assert text.startswith("héllo wor")
    assert "[output truncated: about" in text


def test_namespace_round_trip_in_cpython(session: Session) -> None:
    source = (
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
        "def unbox(b):\n    return b.v\nbox = Box(5)\nitems = [box, box]\nf = lambda: 0\n"
    )
    session.record_definitions(run_cell(source, "<cell-1>", session.ns))
    raw, skipped = namespace.dump(session)
    assert skipped == ["f"]
    session.reset_namespace()
    assert "box" not in session.ns
    assert namespace.load(session, raw) == ["f"]
    restored = session.ns
    assert restored["unbox"](restored["items"][1]) == 5
    assert restored["items"][0] is restored["items"][1]
    assert isinstance(restored["box"], restored["Box"])


def test_llm_query_without_a_host_raises(session: Session) -> None:
    with pytest.raises(LLMQueryError) as caught:
        session.llm_query("hi")
    assert caught.value.code == "no_host"


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
