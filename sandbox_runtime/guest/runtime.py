"""The guest's request loop: `host.mjs` hands every request frame from the supervisor to
`dispatch`, which answers it through `host.reply`."""

from __future__ import annotations

import importlib
import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import rlm_repl

from . import namespace
from .host import Host
from .session import Session

Reply = tuple[dict[str, Any], bytes | None]

#: Largest reply header the guest sends: `sandbox_runtime.worker.framing.MAX_HEADER_BYTES`
#: (the supervisor kills a sandbox whose header is larger, as a forged frame) less 64 bytes:
#: host.mjs adds the request's number (`,"seq":` and at most 11 characters of an int32).
MAX_REPLY_BYTES = 64 * 2**20 - 64
#: Longest error type name sent back (a class name can be made any length).
MAX_ERROR_TYPE_CHARS = 200
#: Bound on a FINAL answer's fields besides its value (the source, a FINAL_VAR name).
MAX_FINAL_META_CHARS = 1024

_session: Session | None = None


def _repl_digest() -> tuple[int, int]:
    # Its size and CRC-32 (zlib is in every snapshot; hashlib is not): tells our own file's
    # versions apart, not a check against tampering (the supervisor writes it).
    with open(rlm_repl.__file__, "rb") as handle:
        source = handle.read()
    return len(source), zlib.crc32(source)


# The memory snapshot holds the modules imported when it was made, rlm_repl among them, but
# its file name covers only the guest and host sources: install() reloads rlm_repl if the
# file the host wrote for this process differs from the one imported here.
_IMPORTED_REPL = _repl_digest()


def install(host: Host, state_bytes: int) -> Session:
    """Create the session and patch `time.sleep`; called once by the host."""
    global _session
    if _repl_digest() != _IMPORTED_REPL:
        importlib.reload(rlm_repl)
    _session = Session(host, state_bytes)
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
        reply_header = {"op": "error", **_bounded_error(rlm_repl.describe_error(exc))}
        reply_payload = None
    encoded = json.dumps(reply_header)  # ASCII (escaped), so its length is its size in bytes
    if len(encoded) > MAX_REPLY_BYTES:
        encoded = json.dumps(
            {
                "op": "error",
                "type": "ResultTooLarge",
                "message": f"the reply is {len(encoded)} bytes as JSON, over the sandbox's "
                f"limit of {MAX_REPLY_BYTES} bytes",
            }
        )
        reply_payload = None
    current.host.reply(encoded, reply_payload)


def _to_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    converted: bytes = payload.to_bytes()  # a JsProxy of a Uint8Array
    return converted


def execute(current: Session, header: dict[str, Any], _: bytes) -> Reply:
    code = str(header["code"])
    limit = int(header["output_bytes"])
    result = current.repl.execute(code, output_max_bytes=limit)
    if result["error"] is None:
        current.record_definitions(code)
    _bound_final(result, limit)
    if result["error"] is not None:
        result["error"] = _bounded_error(result["error"])
    reply = {k: result[k] for k in ("stdout", "stderr", "error", "final", "state", "duration_ms")}
    return {"op": "result", **reply, "memory_bytes": _memory(current)}, None


def _bound_final(result: dict[str, Any], limit: int) -> None:
    """A FINAL value is output: over `limit` (UTF-8 bytes, like stdout) it becomes an error."""
    final = result["final"]
    if final is None:
        return
    value = final.get("value", "")
    # Characters first: a huge value is refused without encoding a copy of it.
    size = len(value) if len(value) > limit else len(value.encode("utf-8"))
    meta = sum(len(str(v)) for k, v in final.items() if k != "value")
    if size <= limit and meta <= MAX_FINAL_META_CHARS:
        return
    result["final"] = None
    if result["error"] is None:
        what = f"{size} bytes" if size > limit else f"{meta} characters of source and name"
        result["error"] = {
            "type": "OutputTooLarge",
            "message": f"the FINAL answer is {what}, over this session's limit of {limit} "
            "bytes (limits.output_bytes): return a shorter answer",
            "traceback": None,
        }


def _bounded_error(error: dict[str, Any]) -> dict[str, Any]:
    """The error fields rlm_repl bounds (message, traceback), and the type name too."""
    kind = str(error.get("type", "Error"))
    if len(kind) > MAX_ERROR_TYPE_CHARS:
        kind = kind[:MAX_ERROR_TYPE_CHARS] + "..."
    return {**error, "type": kind}


def _memory(current: Session) -> int:
    return int(current.host.memory_bytes())


def set_context(current: Session, header: dict[str, Any], data: bytes) -> Reply:
    text = data.decode("utf-8")
    index = header.get("index", 0)
    value = text if header.get("kind") == "str" else json.loads(text)
    namespace.bind_context(current, value, index, rebind=bool(header.get("rebind")))
    return {"op": "ok", "memory_bytes": _memory(current)}, None


def set_state(current: Session, _: dict[str, Any], data: bytes) -> Reply:
    current.repl.set_state(json.loads(data.decode("utf-8")))
    return {"op": "ok"}, None


def get_state(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    return {"op": "state", "state": current.repl.snapshot_state()}, None


def list_vars(current: Session, _: dict[str, Any], __: bytes) -> Reply:
    return {"op": "vars", "variables": current.repl.variables()}, None


def snapshot(current: Session, header: dict[str, Any], __: bytes) -> Reply:
    blob, skipped = namespace.dump(current, contexts=bool(header.get("contexts", True)))
    return {"op": "snapshot", "skipped": skipped}, blob


def restore(current: Session, _: dict[str, Any], data: bytes) -> Reply:
    failed = namespace.load(current, data)
    # The indexes whose contexts the blob left out: the supervisor must bind them again.
    waiting = sorted(current.context_holes)
    reply = {"op": "restored", "skipped": failed, "contexts": waiting}
    return {**reply, "memory_bytes": _memory(current)}, None


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
