"""The sandbox's namespace and the functions it offers to LLM-written code."""

from __future__ import annotations

import ast
import json
import reprlib
import sys
import time
import types
from typing import Any

from .errors import LLMQueryError, StateError
from .host import Host

SLEEP_SLICE_S = 0.1
_REAL_SLEEP = time.sleep
API_NAMES = frozenset(
    {
        "llm_query",
        "llm_query_batched",
        "rlm_query",
        "rlm_query_batched",
        "SHOW_VARS",
        "FINAL",
        "FINAL_VAR",
        "LLMQueryError",
    }
)
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_preview = reprlib.Repr()
_preview.maxstring = 120
_preview.maxother = 120
_preview.maxlist = _preview.maxdict = _preview.maxtuple = _preview.maxset = 8


class _Listing(str):
    """A str that a REPL echoes as text rather than as a quoted repr."""

    def __repr__(self) -> str:
        return str(self)


def is_user_name(name: str) -> bool:
    return not (name.startswith("__") and name.endswith("__")) and name not in API_NAMES


def validate_prompt(prompt: object) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for m in prompt
    ):
        return prompt
    raise TypeError("a prompt is a str or a list of {'role': str, 'content': str} messages")


class Session:
    """One sandbox's user namespace (a `__main__` module, so pickle finds its classes)."""

    def __init__(self, host: Host | None, state_bytes: int) -> None:
        self.host = host
        self.state_bytes = state_bytes
        self.module = types.ModuleType("__main__")
        self.ns: dict[str, Any] = self.module.__dict__
        self.final: dict[str, Any] | None = None
        # name -> source of its latest top-level def/class, in definition order (hibernation).
        self.definitions: dict[str, str] = {}
        self.cells = 0
        sys.modules["__main__"] = self.module
        self.reset_namespace()

    def reset_namespace(self) -> None:
        self.ns.clear()
        self.ns.update({"__name__": "__main__", "__builtins__": __builtins__})
        self.install_api()
        self.ns["context"] = None
        self.ns["state"] = {}
        self.ns["answer"] = {"content": "", "ready": False}

    def install_api(self) -> None:
        self.ns.update(
            {
                "llm_query": self.llm_query,
                "llm_query_batched": self.llm_query_batched,
                "rlm_query": self.rlm_query,
                "rlm_query_batched": self.rlm_query_batched,
                "SHOW_VARS": self.show_vars,
                "FINAL": self.final_value,
                "FINAL_VAR": self.final_var,
                "LLMQueryError": LLMQueryError,
            }
        )

    # -- functions for sandboxed code ------------------------------------------------------

    def llm_query(self, prompt: str | list[dict[str, str]], model: str | None = None) -> str:
        """Ask the sub-call LLM; blocks until the answer. Raises LLMQueryError on failure."""
        return self._one("llm", prompt, model)

    def llm_query_batched(
        self, prompts: list[str | list[dict[str, str]]], model: str | None = None
    ) -> list[str]:
        """Ask several prompts at once (answered in parallel); answers in prompt order."""
        return self._many("llm", prompts, model)

    def rlm_query(self, prompt: str | list[dict[str, str]], model: str | None = None) -> str:
        """Ask a sub-RLM (depth + 1); its final `state` is merged into `state`."""
        return self._one("rlm", prompt, model)

    def rlm_query_batched(
        self, prompts: list[str | list[dict[str, str]]], model: str | None = None
    ) -> list[str]:
        """Several sub-RLMs at once; their states are merged into `state` in prompt order."""
        return self._many("rlm", prompts, model)

    def show_vars(self) -> str:
        """List the user's variables with their types."""
        lines = [f"{v['name']}: {v['type']} = {v['preview']}" for v in self.list_vars()]
        return _Listing("\n".join(lines) if lines else "(no variables)")

    def final_value(self, value: object) -> None:
        """Give the final answer of the run."""
        self.final = {"value": str(value), "source": "FINAL"}

    def final_var(self, name_or_value: object) -> None:
        """Give a variable (by name, or the variable itself) as the final answer."""
        if isinstance(name_or_value, str):
            if name_or_value not in self.ns or not is_user_name(name_or_value):
                raise NameError(f"FINAL_VAR: no variable named {name_or_value!r}")
            self.final = {
                "value": str(self.ns[name_or_value]),
                "source": "FINAL_VAR",
                "name": name_or_value,
            }
            return
        found = next(
            (k for k, v in self.ns.items() if v is name_or_value and is_user_name(k)), None
        )
        self.final = {"value": str(name_or_value), "source": "FINAL_VAR"}
        if found is not None:
            self.final["name"] = found

    # -- bridge ----------------------------------------------------------------------------

    def _one(self, kind: str, prompt: object, model: str | None) -> str:
        result = self._call(kind, [validate_prompt(prompt)], model, batched=False)[0]
        error = result.get("error")
        if error:
            raise LLMQueryError(str(error.get("code", "error")), str(error.get("message", "")))
        return str(result.get("response") or "")

    def _many(self, kind: str, prompts: object, model: str | None) -> list[str]:
        if not isinstance(prompts, list | tuple):
            raise TypeError("prompts must be a list")
        checked = [validate_prompt(p) for p in prompts]
        if not checked:
            return []
        results = self._call(kind, checked, model, batched=True)
        partial: list[str | None] = [
            None if r.get("error") else str(r.get("response") or "") for r in results
        ]
        for index, result in enumerate(results):
            error = result.get("error")
            if error:
                raise LLMQueryError(
                    str(error.get("code", "error")),
                    f"prompt {index}: {error.get('message', '')}",
                    index=index,
                    partial=partial,
                )
        return [p or "" for p in partial]

    def _call(
        self, kind: str, prompts: list[str | list[dict[str, str]]], model: str | None, batched: bool
    ) -> list[dict[str, Any]]:
        if model is not None and not isinstance(model, str):
            raise TypeError("model must be a str or None")
        if self.host is None:
            raise LLMQueryError("no_host", "this interpreter has no host to carry the call")
        call = {
            "kind": kind,
            "prompts": prompts,
            "model": model,
            "batched": batched,
            "state": self.state_json() if kind == "rlm" else None,
        }
        reply = json.loads(self.host.call(json.dumps({"op": "llm_call", "call": call})))
        if reply.get("interrupted"):
            self.host.clear_interrupt()
            raise KeyboardInterrupt
        results = reply.get("results")
        if not isinstance(results, list) or len(results) != len(prompts):
            raise LLMQueryError("bad_reply", "the host answered with the wrong number of results")
        if kind == "rlm":
            state = self.ns.get("state")
            for result in results:
                child_state = result.get("state")
                if isinstance(state, dict) and isinstance(child_state, dict):
                    state.update(child_state)
        return [r if isinstance(r, dict) else {} for r in results]

    # -- state, variables, sleep -----------------------------------------------------------

    def state_json(self) -> dict[str, Any]:
        """The `state` dict as plain JSON values, checked against the size bound."""
        state = self.ns.get("state")
        if not isinstance(state, dict):
            raise StateError("`state` must be a dict")
        try:
            text = json.dumps(state, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StateError(f"`state` must hold JSON values only: {exc}") from exc
        if len(text) > self.state_bytes:
            raise StateError(
                f"`state` is {len(text)} bytes as JSON; the limit is {self.state_bytes}"
            )
        loaded: dict[str, Any] = json.loads(text)
        return loaded

    def list_vars(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, value in list(self.ns.items()):
            if not is_user_name(name) or isinstance(value, types.ModuleType):
                continue
            out.append(
                {
                    "name": name,
                    "type": type(value).__name__,
                    "size": len(value) if isinstance(value, _SIZED) else None,
                    "preview": _preview.repr(value)[:200],
                }
            )
        return out

    def record_definitions(self, statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.definitions.pop(node.name, None)
                self.definitions[node.name] = ast.unparse(node)

    def sleep(self, seconds: float) -> None:
        """time.sleep that waits without spinning and honours the timeout's interrupt."""
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.host is None:
                _REAL_SLEEP(min(remaining, SLEEP_SLICE_S))  # CPython tests only
                continue
            if self.host.sleep(min(remaining, SLEEP_SLICE_S) * 1000):
                self.host.clear_interrupt()
                raise KeyboardInterrupt
