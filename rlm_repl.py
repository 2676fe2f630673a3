"""The RLM REPL functions for any CPython sandbox, in one standard-library-only file.

Copy this file into a container, Modal, E2B or Daytona sandbox and run model code with the
functions every rlm-broker environment offers: `context`, `llm_query`, `llm_query_batched`,
`rlm_query`, `rlm_query_batched`, `SHOW_VARS`, `FINAL`, `FINAL_VAR`, the `answer` dict and the
shared `state` dict. Calls reach the broker over HTTP with a session token:

    RLM_BROKER_URL=http://broker:8080 RLM_SESSION_TOKEN=... python exec_script.py code.py
    python exec_script.py -c 'print(llm_query("hi"))' --context ctx.txt --result out.json

As a module: `build_namespace(transport)` returns the globals for `exec`, and `Repl` runs code
with captured output and reports FINAL/state (the "local" environment uses it). The REPL
functions sit on a small transport (`send(calls) -> results`), so a host with another way out
of its sandbox (a pipe, a socket) reuses them unchanged.

Wire: POST /enqueue {"prompt"|"messages", "model", "depth", "params": {"kind"}, "state"} or
{"batch": [...]}, re-waiting through GET /requests/{id}?wait= while a request is pending.
Connection failures are retried with backoff; each POST carries an `Idempotency-Key`, so a
retried call is never enqueued (or paid for) twice. A failed call raises an `LLMQueryError`,
never returns an error string.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import io
import json
import os
import random
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TextIO

__all__ = [
    "BrokerResponseError",
    "BrokerUnavailableError",
    "HttpTransport",
    "LLMCallError",
    "LLMQueryError",
    "LLMQueryTimeoutError",
    "Repl",
    "StateError",
    "Transport",
    "build_namespace",
    "changed_keys",
    "merge_state",
]

DEFAULT_WAIT_S = 20.0
DEFAULT_STATE_MAX_BYTES = 1_000_000
DEFAULT_OUTPUT_MAX_CHARS = 100_000
_TRUNCATED = "\n[... output truncated ...]\n"


# --- errors ------------------------------------------------------------------------------


class LLMQueryError(Exception):
    """Root of the errors raised by the REPL functions: the call did not produce an answer."""


class BrokerUnavailableError(LLMQueryError):
    """The broker could not be reached, retries included."""


class BrokerResponseError(LLMQueryError):
    """The broker refused the call (bad token, bad body, limits); `status` and `code` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"broker answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class LLMCallError(LLMQueryError):
    """The host answered the request with an error (LLM failure, budget spent, ...)."""

    def __init__(self, code: str, message: str, *, index: int | None = None) -> None:
        where = f" (prompt {index})" if index is not None else ""
        super().__init__(f"{code}: {message}{where}")
        self.code, self.message, self.index = code, message, index


class LLMBatchError(LLMCallError):
    """Some prompts of a batch failed; `results` holds the answers (None where failed)."""

    def __init__(self, errors: list[LLMCallError], results: list[str | None]) -> None:
        first = errors[0]
        super().__init__(first.code, f"{len(errors)} of {len(results)} failed; first: {first}")
        self.errors, self.results = errors, results


class LLMQueryTimeoutError(LLMQueryError):
    """No answer within the call's time limit."""


class StateError(LLMQueryError, ValueError):
    """The shared `state` dict is not JSON or exceeds its size bound."""


# --- transport ---------------------------------------------------------------------------


class Transport(Protocol):
    """Carries LLM requests out of the sandbox: one result dict per call, in order.

    A call is the JSON of `rlm_wire.broker_models.LLMRequest`; a result is the JSON of a finished
    `RequestResult` (`status` "done" with `response`, or "error" with `error`).
    """

    def send(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]: ...


class _Response:
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class HttpTransport:
    """Talks to the broker over HTTP(S) with a session token; one keep-alive connection per thread.

    `timeout_s` bounds each HTTP exchange (long-polls get `wait_s` on top); `call_timeout_s`
    bounds one whole call, re-waits included. Connection failures, 429 and 503 are retried
    `retries` times with jittered exponential backoff.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        wait_s: float = DEFAULT_WAIT_S,
        call_timeout_s: float = 3600.0,
        retries: int = 5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"bad broker URL {base_url!r}")
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout_s, self.wait_s, self.call_timeout_s = timeout_s, wait_s, call_timeout_s
        self.retries, self.backoff_s, self.backoff_max_s = retries, backoff_s, backoff_max_s
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # public --------------------------------------------------------------------------------

    def send(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not calls:
            return []
        deadline = time.monotonic() + self.call_timeout_s
        wait = self._wait_for(deadline)
        # One key per call: a POST whose answer was lost is sent again and the broker
        # enqueues nothing twice (the LLM is not called, nor paid, twice).
        key = {"Idempotency-Key": uuid.uuid4().hex}
        if len(calls) == 1:
            reply = self._request("POST", f"/enqueue?wait={wait}", dict(calls[0]), headers=key)
            results = [_as_dict(reply.body)]
        else:
            body = {"batch": [dict(c) for c in calls]}
            reply = self._request("POST", f"/enqueue?wait={wait}", body, headers=key)
            results = [_as_dict(r) for r in _as_dict(reply.body).get("results", [])]
            if len(results) != len(calls):
                raise BrokerResponseError(reply.status, "bad_body", "result count != batch size")
        return [self._finish(result, deadline) for result in results]

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # plumbing ------------------------------------------------------------------------------

    def _wait_for(self, deadline: float) -> float:
        return round(max(0.0, min(self.wait_s, deadline - time.monotonic())), 3)

    def _finish(self, result: dict[str, Any], deadline: float) -> dict[str, Any]:
        while result.get("status") == "pending":
            if time.monotonic() >= deadline:
                raise LLMQueryTimeoutError(
                    f"request {result.get('id')} unanswered after {self.call_timeout_s} s"
                )
            request_id = urllib.parse.quote(str(result["id"]), safe="")
            path = f"/requests/{request_id}?wait={self._wait_for(deadline)}"
            result = _as_dict(self._request("GET", path, None).body)
        return result

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._scheme == "https":
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(
        self, method: str, path: str, body: Any, *, headers: Mapping[str, str] | None = None
    ) -> _Response:
        """Send with retries; every call is safe to repeat (GETs, and POSTs with a key)."""
        payload = json.dumps(body).encode() if body is not None else None
        attempt = 0
        while True:
            try:
                reply = self._exchange(method, path, payload, headers or {})
            except _Retryable as exc:
                if attempt >= self.retries:
                    raise BrokerUnavailableError(f"{method} {path.split('?')[0]}: {exc}") from exc
            else:
                if reply.status not in (429, 503) or attempt >= self.retries:
                    return _checked(reply)
            attempt += 1
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random() / 2))

    def _exchange(
        self, method: str, path: str, payload: bytes | None, extra: Mapping[str, str]
    ) -> _Response:
        conn = self._connection()
        headers = {**self._headers, **extra}
        wait = _query_wait(path)
        conn.timeout = self.timeout_s + wait
        try:
            if conn.sock is None:
                conn.connect()
            else:
                conn.sock.settimeout(conn.timeout)
        except OSError as exc:  # refused, unreachable, DNS: nothing was sent
            self._drop_connection()
            raise _Retryable(f"connect failed: {exc}") from exc
        try:
            conn.request(method, self._prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")[:200]
        return _Response(response.status, body)


class _Retryable(Exception):
    pass


def _query_wait(path: str) -> float:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    try:
        return float(query.get("wait", ["0"])[0])
    except ValueError:
        return 0.0


def _as_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BrokerResponseError(200, "bad_body", f"expected a JSON object, got {value!r:.200}")
    return value


def _checked(reply: _Response) -> _Response:
    if reply.status < 400:
        return reply
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    if isinstance(error, dict):
        raise BrokerResponseError(
            reply.status, str(error.get("code", "error")), str(error.get("message", ""))
        )
    raise BrokerResponseError(reply.status, "unexpected_body", str(reply.body)[:200])


# --- state -------------------------------------------------------------------------------


def check_state(state: Mapping[str, Any], max_bytes: int) -> dict[str, Any]:
    """A JSON deep copy of `state`; raises `StateError` if it is not JSON or too large."""
    try:
        encoded = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateError(f"state must hold JSON values only: {exc}") from exc
    if len(encoded.encode()) > max_bytes:
        raise StateError(f"state is {len(encoded.encode())} bytes, above its {max_bytes} bound")
    copy: dict[str, Any] = json.loads(encoded)
    return copy


def merge_state(
    target: dict[str, Any], sent: Mapping[str, Any], returned: Mapping[str, Any] | None
) -> None:
    """Apply a child's changes to `target`: `returned` holds the keys the child set.

    The host answers an `rlm_query` with only the keys the child added or changed; a key
    whose value equals what was `sent` is skipped, so a full state merges the same way.
    Deletions are not carried. Batched children merge one after the other, in prompt order.
    """
    if returned is None:
        return
    for key, value in returned.items():
        if key not in sent or sent[key] != value:
            target[key] = value


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `after` that are new or differ from `before` (what a child sends back)."""
    return {k: v for k, v in after.items() if k not in before or before[k] != v}


# --- the REPL functions ------------------------------------------------------------------


class Repl:
    """One REPL session: a namespace with the RLM functions, run code into it, read FINAL.

    `depth` is this REPL's RLM depth (the root is 0); its calls go to the broker at depth+1.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        depth: int = 0,
        max_depth: int = 1,
        state: Mapping[str, Any] | None = None,
        state_max_bytes: int = DEFAULT_STATE_MAX_BYTES,
        output_max_chars: int = DEFAULT_OUTPUT_MAX_CHARS,
        default_model: str | None = None,
    ) -> None:
        self.transport = transport
        self.depth, self.max_depth = depth, max_depth
        self.state_max_bytes, self.output_max_chars = state_max_bytes, output_max_chars
        self.default_model = default_model
        self._sub_calls: list[dict[str, Any]] = []
        self._sub_calls_lock = threading.Lock()
        self.final: dict[str, Any] | None = None
        self._last_good_state = check_state(state or {}, state_max_bytes)
        self.answer: dict[str, Any] = {"content": "", "ready": False}
        self.state: dict[str, Any] = dict(self._last_good_state)
        self.namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": __builtins__,
            "__rlm_repl__": self,
            "context": None,
            "state": self.state,
            "answer": self.answer,
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "SHOW_VARS": self.show_vars,
            "FINAL": self.final_answer,
            "FINAL_VAR": self.final_var,
            "LLMQueryError": LLMQueryError,
        }
        self._reserved = frozenset(self.namespace)

    # calls ---------------------------------------------------------------------------------

    def _call(self, prompt: Any, model: str | None, kind: str) -> dict[str, Any]:
        call: dict[str, Any] = {"depth": self.depth + 1, "params": {"kind": kind}}
        if isinstance(prompt, str):
            call["prompt"] = prompt
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            call["messages"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise TypeError("a prompt is a str or a list of {'role', 'content'} dicts")
        chosen = model if model is not None else self.default_model
        if chosen is not None:
            call["model"] = chosen
        return call

    def _run(self, calls: list[dict[str, Any]], batched: bool) -> list[dict[str, Any]]:
        results = self.transport.send(calls)
        with self._sub_calls_lock:
            self._sub_calls.extend(
                {"id": r["id"], "usage": r["usage"]}
                for r in results
                if isinstance(r.get("id"), str) and isinstance(r.get("usage"), dict)
            )
        failures: list[LLMCallError] = []
        for index, result in enumerate(results):
            if result.get("status") != "done" or not isinstance(result.get("response"), str):
                error = result.get("error") or {}
                failures.append(
                    LLMCallError(
                        str(error.get("code", "error")),
                        str(error.get("message", f"request ended as {result.get('status')}")),
                        index=index if batched else None,
                    )
                )
        if failures:
            if not batched:
                raise failures[0]
            answers = [r.get("response") if r.get("status") == "done" else None for r in results]
            raise LLMBatchError(failures, answers)
        return results

    def llm_query(self, prompt: Any, model: str | None = None) -> str:
        """One sub-LLM call; returns its text or raises LLMQueryError."""
        response: str = self._run([self._call(prompt, model, "llm")], False)[0]["response"]
        return response

    def llm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Many sub-LLM calls, answered in parallel by the host; answers in prompt order."""
        if not prompts:
            return []
        calls = [self._call(p, model, "llm") for p in prompts]
        return [r["response"] for r in self._run(calls, True)]

    def rlm_query(self, prompt: Any, model: str | None = None) -> str:
        """A sub-RLM (depth + 1) that starts from this REPL's `state`; its changes merge back."""
        return self.rlm_query_batched([prompt], model)[0]

    def rlm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Sub-RLMs in parallel, each from the same `state`; changes merge in prompt order."""
        if not prompts:
            return []
        live = self._live_state()
        sent = check_state(live, self.state_max_bytes)
        calls = [self._call(p, model, "rlm") for p in prompts]
        for call in calls:
            call["state"] = sent
        results = self._run(calls, len(calls) > 1)
        for result in results:
            merge_state(live, sent, result.get("state"))
        return [r["response"] for r in results]

    def _live_state(self) -> dict[str, Any]:
        # The code may have rebound `state` to a new dict; that one is the state now.
        current = self.namespace.get("state")
        if isinstance(current, dict):
            self.state = current
        return self.state

    # finishing -----------------------------------------------------------------------------

    def final_answer(self, value: Any) -> Any:
        """FINAL(x): end the run with `x` as the answer."""
        self.final = {"value": _text(value), "source": "FINAL"}
        return value

    def final_var(self, name_or_value: Any) -> Any:
        """FINAL_VAR(name): end the run with the variable `name` (or a value) as the answer."""
        if isinstance(name_or_value, str):
            name = name_or_value.strip().strip("'\"")
            if name in self.namespace and name not in self._reserved:
                value = self.namespace[name]
                self.final = {"value": _text(value), "source": "FINAL_VAR", "name": name}
                return value
            if name.isidentifier():
                raise NameError(f"FINAL_VAR: no variable named {name!r}; define it first")
        self.final = {"value": _text(name_or_value), "source": "FINAL_VAR"}
        return name_or_value

    def show_vars(self) -> str:
        """The user's variables with their types (and sizes where they have one)."""
        lines = []
        for name, value in self.namespace.items():
            if name.startswith("_") or name in self._reserved - {"context", "state", "answer"}:
                continue
            if callable(value) and getattr(value, "__module__", None) == __name__:
                continue
            size = f", len={len(value)}" if hasattr(value, "__len__") else ""
            lines.append(f"{name}: {type(value).__name__}{size}")
        return "\n".join(lines) if lines else "(no variables)"

    def take_final(self) -> dict[str, Any] | None:
        """FINAL/FINAL_VAR if called, else the `answer` dict once ready, else None."""
        if self.final is not None:
            return self.final
        answer = self.namespace.get("answer")
        if isinstance(answer, dict) and answer.get("ready"):
            self.final = {"value": _text(answer.get("content", "")), "source": "answer"}
        return self.final

    # running code --------------------------------------------------------------------------

    def load_context(self, value: Any) -> None:
        """Bind `context` (str, list of str, or dict) without passing it through code."""
        self.namespace["context"] = value

    def snapshot_state(self) -> dict[str, Any]:
        """A JSON copy of `state`; the last valid one if the code left it invalid."""
        with contextlib.suppress(StateError):
            self._last_good_state = check_state(self._live_state(), self.state_max_bytes)
        return dict(self._last_good_state)

    def execute(self, code: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Run `code` in the namespace; the fields of `rlm_wire.runtime_models.ExecutionResult`.

        Output is captured for this thread only (other threads print normally) and capped.
        The timeout raises KeyboardInterrupt inside the code from a timer: it stops Python
        loops but not a blocking C call, which is interrupted only when that call returns.
        """
        out, err = _CappedBuffer(self.output_max_chars), _CappedBuffer(self.output_max_chars)
        with self._sub_calls_lock:
            self._sub_calls = []
        error: dict[str, Any] | None = None
        timer = _Timer()
        started = time.perf_counter()
        try:
            with _captured(out, err), _interrupt_after(timeout_s, timer):
                try:
                    exec(compile(code, "<repl>", "exec"), self.namespace)  # noqa: S102
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - the model's errors are its output
                    error = {
                        "type": type(exc).__name__,
                        "message": str(exc),
                        "traceback": _model_traceback(exc),
                    }
        except KeyboardInterrupt:
            if not timer.fired:
                raise
            error = {
                "type": "TimeoutError",
                "message": f"execution exceeded {timeout_s} s and was interrupted",
                "traceback": None,
            }
        state = self.snapshot_state()
        if error is None:
            try:
                check_state(self.state, self.state_max_bytes)
            except StateError as exc:
                error = {"type": "StateError", "message": str(exc), "traceback": None}
        return {
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "error": error,
            "final": self.take_final(),
            "duration_ms": (time.perf_counter() - started) * 1000,
            "memory_bytes": 0,
            "state": state,
            "sub_calls": self._take_sub_calls(),
        }

    def _take_sub_calls(self) -> list[dict[str, Any]]:
        """The answered sub-calls of the execution that just ran, for the host's accounting."""
        with self._sub_calls_lock:
            taken, self._sub_calls = self._sub_calls, []
        return taken


def build_namespace(
    transport: Transport | None = None,
    *,
    context: Any = None,
    depth: int | None = None,
    max_depth: int | None = None,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Globals for `exec` holding the REPL functions; the `Repl` is under `__rlm_repl__`.

    Without a transport, one is built from RLM_BROKER_URL and RLM_SESSION_TOKEN (optional:
    RLM_BROKER_WAIT_S, RLM_CALL_TIMEOUT_S, RLM_BROKER_RETRIES), and the depth from RLM_DEPTH /
    RLM_MAX_DEPTH.
    """
    environ = os.environ
    if transport is None:
        url, token = environ.get("RLM_BROKER_URL"), environ.get("RLM_SESSION_TOKEN")
        if not url or not token:
            raise RuntimeError("set RLM_BROKER_URL and RLM_SESSION_TOKEN")
        transport = HttpTransport(
            url,
            token,
            wait_s=float(environ.get("RLM_BROKER_WAIT_S", DEFAULT_WAIT_S)),
            call_timeout_s=float(environ.get("RLM_CALL_TIMEOUT_S", "3600")),
            retries=int(environ.get("RLM_BROKER_RETRIES", "5")),
        )
    repl = Repl(
        transport,
        depth=depth if depth is not None else int(environ.get("RLM_DEPTH", "0")),
        max_depth=max_depth if max_depth is not None else int(environ.get("RLM_MAX_DEPTH", "1")),
        state=state,
    )
    repl.load_context(context)
    return repl.namespace


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _model_traceback(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<repl>"]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines)


# --- output capture and timeouts ---------------------------------------------------------


class _CappedBuffer(io.StringIO):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.size, self.truncated = limit, 0, False

    def write(self, text: str) -> int:
        if self.truncated:
            return len(text)
        room = self.limit - self.size
        if len(text) > room:
            super().write(text[: max(room, 0)])
            super().write(_TRUNCATED)
            self.truncated = True
        else:
            super().write(text)
        self.size += len(text)
        return len(text)


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/stderr: writes of a capturing thread go to its buffer."""

    local = threading.local()

    def __init__(self, which: str, fallback: TextIO) -> None:
        self.which, self.fallback = which, fallback

    def _target(self) -> TextIO:
        target: TextIO | None = getattr(self.local, self.which, None)
        return target if target is not None else self.fallback

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False


_install_lock = threading.Lock()


@contextlib.contextmanager
def _captured(out: TextIO, err: TextIO) -> Iterator[None]:
    with _install_lock:
        for which in ("stdout", "stderr"):
            current = getattr(sys, which)
            if not isinstance(current, _ThreadRouter):
                setattr(sys, which, _ThreadRouter(which, current))
    local = _ThreadRouter.local
    previous = (getattr(local, "stdout", None), getattr(local, "stderr", None))
    local.stdout, local.stderr = out, err
    try:
        yield
    finally:
        local.stdout, local.stderr = previous


class _Timer:
    fired = False


@contextlib.contextmanager
def _interrupt_after(timeout_s: float | None, state: _Timer) -> Iterator[None]:
    if timeout_s is None:
        yield
        return
    thread_id = threading.get_ident()
    lock = threading.Lock()
    done = False

    def fire() -> None:
        with lock:
            if not done:
                state.fired = True
                _async_raise(thread_id, KeyboardInterrupt)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            done = True
        timer.cancel()
        if state.fired:
            _async_raise(thread_id, None)  # drop the interrupt if it was not delivered yet


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    target = ctypes.py_object(exc) if exc is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


# --- script entry ------------------------------------------------------------------------


def _load_json_or_text(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        return json.loads(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """`python exec_script.py FILE | -c CODE [--context F] [--state F] [--result F]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="Python file to run")
    source.add_argument("-c", dest="code", help="Python code to run")
    parser.add_argument("--context", help="file loaded as `context` (.json parsed, else text)")
    parser.add_argument("--state", help="JSON file: the initial `state` dict")
    parser.add_argument("--result", help="write {error, final, state} here as JSON")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per execution")
    args = parser.parse_args(argv)
    code = args.code
    if code is None:
        with open(args.file, encoding="utf-8") as handle:
            code = handle.read()
    state = _load_json_or_text(args.state) if args.state else None
    namespace = build_namespace(
        context=_load_json_or_text(args.context) if args.context else None, state=state
    )
    repl: Repl = namespace["__rlm_repl__"]
    outcome = repl.execute(code, timeout_s=args.timeout)
    sys.stdout.write(outcome["stdout"])
    sys.stderr.write(outcome["stderr"])
    if outcome["error"] is not None and outcome["error"]["traceback"]:
        sys.stderr.write(outcome["error"]["traceback"])
    elif outcome["error"] is not None:
        sys.stderr.write(f"{outcome['error']['type']}: {outcome['error']['message']}\n")
    if args.result:
        keep = {k: outcome[k] for k in ("error", "final", "state")}
        with open(args.result, "w", encoding="utf-8") as handle:
            json.dump(keep, handle)
    return 1 if outcome["error"] is not None else 0


if __name__ == "__main__":
    sys.exit(main())
