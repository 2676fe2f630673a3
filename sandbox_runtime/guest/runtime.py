"""The guest's request loop: `host.mjs` hands every request frame from the supervisor to
`dispatch`, which answers it through `host.reply`."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from . import namespace
from .cells import describe, restore_stdio, run_cell
from .errors import StateError
from .host import Host
from .output import CappedWriter
from .session import Session

Reply = tuple[dict[str, Any], bytes | None]

_session: Session | None = None


def install(host: Host | None, state_bytes: int) -> Session:
    """Create the session namespace and patch `time.sleep`; called once by the host."""
    global _session
    _session = Session(host, state_bytes)
    if host is not None:
        time.sleep = _session.sleep  # type: ignore[assignment]
        for leaked in ("_", "PYTHONINSPECT"):  # the host script's path; a REPL flag
            os.environ.pop(leaked, None)
    return _session


def session() -> Session:
    if _session is None:
        raise RuntimeError("runtime.install() was not called")
    return _session


def dispatch(header_json: str, payload: Any) -> None:
    """Serve one request frame and send its reply (errors become an "error" reply)."""
    current = session()
    try:
        header = json.loads(header_json)
        data = b"" if payload is None else _to_bytes(payload)
        reply_header, reply_payload = _HANDLERS[header["op"]](current, header, data)
    except BaseException as exc:  # noqa: BLE001 -- top of the request loop: reported to the supervisor
        reply_header = {"op": "error", **describe(exc)}
        reply_payload = None
    if current.host is None:
        raise RuntimeError("dispatch needs a host")
    current.host.reply(json.dumps(reply_header), reply_payload)


def _to_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    converted: bytes = payload.to_bytes()  # a JsProxy of a Uint8Array
    return converted


def execute(current: Session, header: dict[str, Any], _: bytes) -> Reply:
    limit = int(header["output_bytes"])
    out, err = CappedWriter(limit), CappedWriter(limit)
    current.final = None
    current.cells += 1
    filename = f"<cell-{current.cells}>"
    saved = sys.stdout, sys.stderr
    error: dict[str, str] | None = None
    started = time.perf_counter()
    sys.stdout, sys.stderr = out, err
    try:
        current.record_definitions(run_cell(str(header["code"]), filename, current.ns))
    except BaseException as exc:  # noqa: BLE001 -- whatever user code raised is its result
        error = describe(exc)
    finally:
        restore_stdio(*saved)
    duration_ms = (time.perf_counter() - started) * 1000
    state: dict[str, Any] | None = None
    try:
        state = current.state_json()
    except StateError as exc:
        if error is None:
            error = {"type": "StateError", "message": str(exc)}
    return {
        "op": "result",
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "error": error,
        "final": current.final or _answer_final(current),
        "state": state,
        "duration_ms": duration_ms,
        "memory_bytes": _memory(current),
    }, None


def _answer_final(current: Session) -> dict[str, Any] | None:
    answer = current.ns.get("answer")
    if isinstance(answer, dict) and answer.get("ready") is True:
        return {"value": str(answer.get("content", "")), "source": "answer"}
    return None


def _memory(current: Session) -> int:
    return int(current.host.memory_bytes()) if current.host is not None else 0


def set_context(current: Session, header: dict[str, Any], data: bytes) -> Reply:
    text = data.decode("utf-8")
    current.ns["context"] = text if header.get("kind") == "str" else json.loads(text)
    return {"op": "ok", "memory_bytes": _memory(current)}, None


def set_state(current: Session, _: dict[str, Any], data: bytes) -> Reply:
    state = json.loads(data.decode("utf-8"))
    if not isinstance(state, dict):
        raise StateError("state must be a JSON object")
    if len(data) > current.state_bytes:
        raise StateError(f"state is {len(data)} bytes as JSON; the limit is {current.state_bytes}")
    current.ns["state"] = state
    return {"op": "ok"}, None


def get_state(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    return {"op": "state", "state": current.state_json()}, None


def list_vars(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    return {"op": "vars", "variables": current.list_vars()}, None


def snapshot(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    blob, skipped = namespace.dump(current)
    return {"op": "snapshot", "skipped": skipped}, blob


def restore(current: Session, _: dict[str, Any], data: bytes) -> Reply:
    failed = namespace.load(current, data)
    return {"op": "restored", "skipped": failed, "memory_bytes": _memory(current)}, None


def ping(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    return {"op": "pong", "memory_bytes": _memory(current)}, None


_HANDLERS: dict[str, Callable[[Session, dict[str, Any], bytes], Reply]] = {
    "execute": execute,
    "set_context": set_context,
    "set_state": set_state,
    "get_state": get_state,
    "list_vars": list_vars,
    "snapshot": snapshot,
    "restore": restore,
    "ping": ping,
}
