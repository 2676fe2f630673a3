"""The JavaScript host as the guest sees it, and the REPL's transport over it (the pipe)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import rlm_repl


class Host(Protocol):
    """Functions that `host.mjs` hands to `runtime.install`."""

    def call(self, header_json: str) -> str:
        """Send a request frame to the supervisor and block until its reply; returns its JSON."""

    def reply(self, header_json: str, payload: Any) -> None:
        """Send the reply frame of the request being served (payload: bytes or None)."""

    def memory_bytes(self) -> int:
        """Current size of the WebAssembly memory."""

    def sleep(self, ms: float) -> bool:
        """Block up to `ms` milliseconds without spinning; True when an interrupt is pending."""

    def clear_interrupt(self) -> None:
        """Forget a pending interrupt (after raising KeyboardInterrupt for it ourselves)."""


class PipeTransport:
    """`rlm_repl.Transport` over the supervisor's pipe: one `llm_call` frame per `send`.

    The supervisor's bridge carries the call to the broker (with the token the sandbox never
    sees, at the session's depth, refusing `rlm_query` at max_depth) and answers with one
    `LLMCallResult` per prompt, or `interrupted` when the execution's time is up (raised
    here as KeyboardInterrupt, like the interrupt buffer does).
    """

    def __init__(self, host: Host) -> None:
        self._host = host

    def send(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not calls:
            return []
        first = calls[0]
        call = {
            "kind": first["params"]["kind"],
            "prompts": [c["prompt"] if "prompt" in c else c["messages"] for c in calls],
            "model": first.get("model"),
            "batched": len(calls) > 1,
            "state": first.get("state"),
        }
        if "tool" in first["params"]:  # call_tool: the host-side tool it runs
            call["tool"] = first["params"]["tool"]
        reply = json.loads(self._host.call(json.dumps({"op": "llm_call", "call": call})))
        if reply.get("interrupted"):
            self._host.clear_interrupt()
            raise KeyboardInterrupt
        results = reply.get("results")
        if not isinstance(results, list) or len(results) != len(calls):
            raise rlm_repl.LLMQueryError("bad_reply", "the host answered with a wrong result count")
        return [_as_result(r) for r in results]


def _as_result(result: Any) -> dict[str, Any]:
    """An `LLMCallResult` as the `RequestResult` JSON that `rlm_repl` reads."""
    if not isinstance(result, dict):
        return {"status": "error", "error": {"code": "bad_reply", "message": repr(result)[:200]}}
    error = result.get("error")
    if error is None and isinstance(result.get("response"), str):
        return {"status": "done", "response": result["response"], "state": result.get("state")}
    if not isinstance(error, dict):
        error = {"code": "empty_answer", "message": "the host answered without a response"}
    return {"status": "error", "error": error}
