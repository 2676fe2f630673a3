"""The REPL that model code sees, in one standard-library-only file: every environment runs it.

The functions: `context`, `llm_query`, `llm_query_batched`, `rlm_query`, `rlm_query_batched`,
`SHOW_VARS`, `FINAL`, `FINAL_VAR`, `call_tool` (the run's host-side tools, carried like
`llm_query`), the `answer` dict and the shared `state` dict. They sit on
a small transport (`send(calls) -> results`): `HttpTransport` reaches the broker with a
session token (the "local" environment, and this file as a script); the Pyodide sandbox loads
this same file and gives it a pipe to its supervisor (`sandbox_runtime/guest`).

As a script, in any CPython sandbox (container, Modal, E2B, Daytona):

    RLM_BROKER_URL=http://broker:8000 RLM_SESSION_TOKEN=... python rlm_repl.py code.py
    python -I -S rlm_repl.py -c 'print(llm_query("hi"))' --context ctx.txt --result out.json
    python -I -S rlm_repl.py --serve    # JSON lines on stdin/stdout, variables kept (below)

`--serve` keeps one namespace for many executions: each stdin line is a request,
`{"code": str, "timeout_s"?: float, "output_bytes"?: int}` or `{"context"?: ...,
"context_index"?: int, "state"?: {...}}`, and each gets one stdout line: the execution's result
(`ExecutionResult`'s fields), `{"ok": true}`, or `{"protocol_error": "..."}` for a malformed
or oversized request; EOF ends it. The protocol runs on private copies of fds 0 and 1:
model code reads /dev/null and prints to stderr.
`RLM_BROKER_URL=http+unix://%2Frun%2Frlm%2Fbroker.sock` reaches the broker through a unix
socket (a sandbox without a network, its host relaying).

As a module: `Repl(transport, ...)` runs code with captured, capped output and reports
FINAL/state (`build_namespace(transport)` gives just the globals for `exec`).

Wire (HttpTransport): POST /enqueue {"prompt"|"messages", "model", "depth", "params":
{"kind"}, "state"} or {"batch": [...]}, re-waiting through GET /requests/{id}?wait= while a
request is pending. Connection failures and 429/502/503/504 answers are retried under
`RetryPolicy` (jittered backoff, `Retry-After` honoured, about a minute in all); each POST
carries an `Idempotency-Key`, so a retried call is never enqueued (or paid for) twice. A
failed call raises an `LLMQueryError`, never returns an error string.
"""

from __future__ import annotations

# Imported where they are used (argparse, ctypes, email.utils, http.client, urllib.parse): the
# Pyodide sandbox imports this module into its memory snapshot and talks over a pipe, not
# HTTP, and those modules cost ~1.6 MiB of every sandbox's memory (docs/performance.md).
import ast
import builtins
import contextlib
import dataclasses
import functools
import io
import json
import linecache
import os
import random
import reprlib
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import http.client

__all__ = [
    "API_NAMES",
    "MAX_CONTEXTS",
    "RETRYABLE_STATUSES",
    "BrokerResponseError",
    "BrokerUnavailableError",
    "HttpTransport",
    "LLMQueryError",
    "LLMQueryTimeoutError",
    "Repl",
    "RetryClock",
    "RetryPolicy",
    "StateError",
    "Transport",
    "batch_slices",
    "build_namespace",
    "changed_keys",
    "describe_error",
    "is_message",
    "is_user_name",
    "merge_state",
    "protocol_streams",
    "remember_source",
    "retry_after_s",
    "serve",
]

DEFAULT_WAIT_S = 20.0
DEFAULT_STATE_MAX_BYTES = 1_000_000
DEFAULT_OUTPUT_MAX_BYTES = 1 << 20
MAX_TRACEBACK_CHARS = 20_000
MAX_MESSAGE_CHARS = 4_000
CELL_PREFIX = "<cell-"
#: Contexts a session can hold: `context_0` ... `context_{MAX_CONTEXTS - 1}`.
MAX_CONTEXTS = 256

#: What the REPL binds in every namespace: never a user variable (not listed, not kept).
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
        "StateError",
        "call_tool",
    }
)
#: How a host-side tool's REPL function ends its docstring (`host_poller.rlm.tools`): SHOW_VARS
#: leaves such functions out. In the docstring because a hibernated sandbox keeps a function
#: as its source, which a mark set after the `def` would not survive.
TOOL_DOC_MARK = "Runs on the host (a host-side tool)."


# --- errors ------------------------------------------------------------------------------


class LLMQueryError(Exception):
    """A REPL call did not produce an answer; the root of the REPL's errors.

    Raised as is when the call was answered with an error (LLM failure, budget spent,
    `rlm_query` at max_depth, ...). `code` says why in one word, `message` in words; after a
    failed prompt of a batched call, `index` is the first failed prompt and `partial` holds
    the answers in prompt order (None where a prompt failed).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        index: int | None = None,
        partial: list[str | None] | None = None,
    ) -> None:
        detail = message if index is None else f"prompt {index}: {message}"
        failed = partial.count(None) if partial is not None else 0
        if partial is not None and failed > 1:
            detail += f" ({failed} of {len(partial)} prompts failed)"
        super().__init__(f"{code}: {detail}")
        self.code, self.message, self.index, self.partial = code, message, index, partial


class BrokerUnavailableError(LLMQueryError):
    """The broker could not be reached, retries included."""

    def __init__(self, message: str) -> None:
        super().__init__("broker_unavailable", message)


class BrokerResponseError(LLMQueryError):
    """The broker refused the call (bad token, bad body, limits); `status` and `code` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, f"broker answered {status}: {message}")
        self.status = status


class LLMQueryTimeoutError(LLMQueryError):
    """No answer within the call's time limit."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class StateError(LLMQueryError, ValueError):
    """The shared `state` dict is not a dict of JSON values, or exceeds its size bound."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_state", message)


# --- retries -----------------------------------------------------------------------------

#: Statuses worth another try: rate limited (429), unavailable (503: Redis down, a replica
#: draining) and the 502/504 a proxy or tunnel answers while the broker restarts. Only calls
#: that are safe to repeat are retried: reads, answers, and POSTs carrying an Idempotency-Key.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a broker client tries again: the one retry policy of every client of the broker.

    This REPL's `HttpTransport`, the sandbox runtime's bridge, the host's `BrokerClient` and
    the poller all take one of these. It lives here because this file must stand alone in a
    sandbox; `rlm_wire`'s clients (which never import the REPL) accept it through their
    `RetrySchedule` protocol. Pauses start at `initial_s` and double up to `max_pause_s`,
    each drawn in [pause/2, pause] so that clients cut off together do not come back
    together; a server's `Retry-After` lengthens a pause. A call gives up once its next pause
    would end more than `deadline_s` after its first try; the poller, which must outlast any
    outage, uses an infinite deadline. `retryable_statuses` are the answers worth another try.
    """

    deadline_s: float = 60.0
    initial_s: float = 0.05
    max_pause_s: float = 5.0
    retryable_statuses: frozenset[int] = RETRYABLE_STATUSES

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_pause_s) or self.deadline_s < 0:
            raise ValueError(
                "RetryPolicy needs 0 < initial_s <= max_pause_s and deadline_s >= 0, "
                f"got {self.initial_s}, {self.max_pause_s}, {self.deadline_s}"
            )

    def pause(self, retry: int, retry_after: str | None = None) -> float:
        """The pause before retry number `retry` (0 for the first); `retry_after` is the
        server's `Retry-After` header, if it sent one."""
        ceiling = min(self.max_pause_s, self.initial_s * 2.0 ** min(retry, 64))
        pause = ceiling * (0.5 + random.random() / 2)
        asked = retry_after_s(retry_after)
        return pause if asked is None else max(pause, asked)

    def start(self) -> RetryClock:
        """The retry clock of one call, its deadline counted from now."""
        return RetryClock(self)


class RetryClock:
    """One call's retries under a `RetryPolicy`, on the monotonic clock."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.retries = 0
        self._deadline = time.monotonic() + policy.deadline_s

    @property
    def remaining_s(self) -> float:
        return self._deadline - time.monotonic()

    def next_pause(self, retry_after: str | None = None) -> float | None:
        """The pause before the next try, or None: the deadline does not leave room for it."""
        pause = self.policy.pause(self.retries, retry_after)
        if pause > self.remaining_s:
            return None
        self.retries += 1
        return pause


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` header's delay in seconds (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- batches ------------------------------------------------------------------------------

#: Most prompts and bytes (as JSON) of one `/enqueue` batch a client sends: well under the
#: broker's own bounds (RLM_MAX_ENQUEUE_BATCH, 1024; RLM_MAX_BODY_BYTES, 16 MiB), so that
#: `llm_query_batched` of any length, or of a large context's chunks, is never refused for
#: its size: it goes out in slices.
SLICE_MAX_PROMPTS = 256
SLICE_MAX_BYTES = 4 * 2**20


def batch_slices(
    sizes: Sequence[int], *, max_prompts: int = SLICE_MAX_PROMPTS, max_bytes: int = SLICE_MAX_BYTES
) -> list[range]:
    """Consecutive slices of a batch whose prompts are `sizes` bytes each: each slice under
    both bounds (a prompt larger than `max_bytes` goes alone; the broker judges it)."""
    slices: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        full = index - start >= max_prompts or (index > start and used + size > max_bytes)
        if full:
            slices.append(range(start, index))
            start, used = index, 0
        used += size
    if start < len(sizes):
        slices.append(range(start, len(sizes)))
    return slices


# --- transport ---------------------------------------------------------------------------


class Transport(Protocol):
    """Carries LLM requests out of the sandbox: one result dict per call, in order.

    A call is the JSON of `rlm_wire.broker_models.LLMRequest`; a result is the JSON of a finished
    `RequestResult` (`status` "done" with `response`, or "error" with `error`).
    """

    def send(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]: ...


class _Response:
    def __init__(self, status: int, body: Any, retry_after: str | None = None) -> None:
        self.status, self.body, self.retry_after = status, body, retry_after


@functools.cache
def _unix_http_connection() -> type[http.client.HTTPConnection]:
    """The class of HTTP connections over a unix stream socket (`http+unix://` URLs), made on
    first use (http.client is imported then)."""
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self, path: str, timeout: float) -> None:
            super().__init__("localhost", timeout=timeout)
            self.unix_path = path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.unix_path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixHTTPConnection


class HttpTransport:
    """Talks to the broker over HTTP(S) with a session token; one keep-alive connection per thread.

    `base_url` is `http://`, `https://`, or `http+unix://<percent-encoded socket path>[/prefix]`
    (HTTP over a unix socket, `Host: localhost`).

    `timeout_s` bounds each HTTP exchange (long-polls get `wait_s` on top); `call_timeout_s`
    bounds one whole call, re-waits included. Failed exchanges (no answer, or 429, 502, 503,
    504) are retried under `retry`, the one retry policy of every broker client.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        wait_s: float = DEFAULT_WAIT_S,
        call_timeout_s: float = 3600.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        import http.client
        import urllib.parse

        parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
        # The socket path is the percent-encoded "host"; `hostname` would lower-case it.
        self._unix_path = (
            urllib.parse.unquote(parsed.netloc) if parsed.scheme == "http+unix" else ""
        )
        if parsed.scheme == "http+unix":
            if not self._unix_path:
                raise ValueError(f"bad broker URL {base_url!r}: no socket path")
        elif parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"bad broker URL {base_url!r}")
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname or "", parsed.port
        self._prefix = parsed.path
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.timeout_s, self.wait_s, self.call_timeout_s = timeout_s, wait_s, call_timeout_s
        self.retry = retry if retry is not None else RetryPolicy()
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        # Bound here, once: not imported again on the llm_query path.
        #: what a failed exchange raises (retried, on a new connection)
        self._exchange_errors = (OSError, http.client.HTTPException)
        self._quote = urllib.parse.quote

    def send(self, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not calls:
            return []
        deadline = time.monotonic() + self.call_timeout_s
        if len(calls) == 1:
            results = [self._enqueue_one(calls[0], self._wait_for(deadline))]
        else:
            slices = batch_slices([len(json.dumps(call)) for call in calls])
            # One slice: wait there for the answers. Several: enqueue them all at once (no
            # wait), then re-wait on each; the broker answers them in parallel either way.
            wait = self._wait_for(deadline) if len(slices) == 1 else 0.0
            results = []
            for part in slices:
                results += self._enqueue_batch([calls[i] for i in part], wait)
        return [self._finish(result, deadline) for result in results]

    def _enqueue_one(self, call: Mapping[str, Any], wait: float) -> dict[str, Any]:
        # One key per POST: a POST whose answer was lost is sent again and the broker
        # enqueues nothing twice (the LLM is not called, nor paid, twice).
        key = {"Idempotency-Key": _idempotency_key()}
        reply = self._request("POST", f"/enqueue?wait={wait}", dict(call), headers=key)
        return _as_dict(reply.body)

    def _enqueue_batch(
        self, calls: Sequence[Mapping[str, Any]], wait: float
    ) -> list[dict[str, Any]]:
        key = {"Idempotency-Key": _idempotency_key()}
        body = {"batch": [dict(c) for c in calls]}
        reply = self._request("POST", f"/enqueue?wait={wait}", body, headers=key)
        results = [_as_dict(r) for r in _as_dict(reply.body).get("results", [])]
        if len(results) != len(calls):
            raise BrokerResponseError(reply.status, "bad_body", "result count != batch size")
        return results

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def _wait_for(self, deadline: float) -> float:
        return round(max(0.0, min(self.wait_s, deadline - time.monotonic())), 3)

    def _finish(self, result: dict[str, Any], deadline: float) -> dict[str, Any]:
        while result.get("status") == "pending":
            if time.monotonic() >= deadline:
                raise LLMQueryTimeoutError(
                    f"request {result.get('id')} unanswered after {self.call_timeout_s} s"
                )
            request_id = self._quote(str(result["id"]), safe="")
            path = f"/requests/{request_id}?wait={self._wait_for(deadline)}"
            result = _as_dict(self._request("GET", path, None).body)
        return result

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            import http.client

            if self._unix_path:
                conn = _unix_http_connection()(self._unix_path, timeout=self.timeout_s)
            elif self._scheme == "https":
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
        clock: RetryClock | None = None
        while True:
            try:
                reply = self._exchange(method, path, payload, headers or {})
            except _Retryable as exc:
                clock = clock or self.retry.start()
                pause = clock.next_pause()
                if pause is None:
                    raise BrokerUnavailableError(
                        f"{method} {path.split('?')[0]}: {exc} ({clock.retries} retries)"
                    ) from exc
            else:
                if reply.status not in self.retry.retryable_statuses:
                    return _checked(reply)
                clock = clock or self.retry.start()
                pause = clock.next_pause(reply.retry_after)
                if pause is None:
                    return _checked(reply)
            time.sleep(pause)

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
        except self._exchange_errors as exc:
            self._drop_connection()
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")[:200]
        return _Response(response.status, body, response.getheader("Retry-After"))


class _Retryable(Exception):
    pass


def _idempotency_key() -> str:
    """A random key naming one POST (uuid4's 122 random bits; 128 here, as hex)."""
    return os.urandom(16).hex()


def _query_wait(path: str) -> float:
    import urllib.parse

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


def check_state(state: Any, max_bytes: int) -> dict[str, Any]:
    """A JSON deep copy of `state`; raises `StateError` if it is not a dict of JSON values
    or is above `max_bytes` as JSON."""
    if not isinstance(state, dict):
        raise StateError(f"state must be a dict of JSON values, not {type(state).__name__}")
    try:
        encoded = json.dumps(state, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StateError(f"state must hold JSON values only: {exc}") from exc
    if len(encoded) > max_bytes:
        raise StateError(f"state is {len(encoded)} bytes as JSON, above its {max_bytes} bound")
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


# --- the namespace -----------------------------------------------------------------------


def is_user_name(name: str) -> bool:
    """A variable of the model's code: not a dunder name, not a REPL function."""
    return not (name.startswith("__") and name.endswith("__")) and name not in API_NAMES


def _is_tool_function(value: Any) -> bool:
    # A plain function's own __doc__: never an attribute lookup that model code could hook.
    return isinstance(value, types.FunctionType) and str(value.__doc__ or "").endswith(
        TOOL_DOC_MARK
    )


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_preview = reprlib.Repr()
_preview.maxstring = _preview.maxother = 120
_preview.maxlist = _preview.maxdict = _preview.maxtuple = _preview.maxset = 8


class _Listing(str):
    """A str that the REPL echoes as text rather than as a quoted repr (SHOW_VARS)."""

    def __repr__(self) -> str:
        return str(self)


class Repl:
    """One REPL session: a namespace with the RLM functions, run code into it, read FINAL.

    `depth` is this REPL's RLM depth (the root is 0); its calls go to the broker at depth+1.
    `rlm_query` is refused when depth + 1 >= `max_depth`; with `max_depth` None the transport
    enforces the depth (the sandbox runtime's bridge does, with the same error). `namespace`
    is the dict to run code in (e.g. a module's `__dict__`); it is emptied first.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        depth: int = 0,
        max_depth: int | None = 1,
        state: Mapping[str, Any] | None = None,
        state_max_bytes: int = DEFAULT_STATE_MAX_BYTES,
        output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES,
        default_model: str | None = None,
        namespace: dict[str, Any] | None = None,
    ) -> None:
        self.transport = transport
        self.depth, self.max_depth = depth, max_depth
        self.state_max_bytes, self.output_max_bytes = state_max_bytes, output_max_bytes
        self.default_model = default_model
        self.final: dict[str, Any] | None = None
        self.cells = 0
        self._sub_calls: list[dict[str, Any]] = []
        self._sub_calls_lock = threading.Lock()
        self._last_good_state = check_state(dict(state or {}), state_max_bytes)
        self.namespace: dict[str, Any] = namespace if namespace is not None else {}
        self.reset()

    def reset(self) -> None:
        """Empty the namespace: the REPL functions, no `context`, the last valid `state`."""
        self.namespace.clear()
        self.namespace.update(
            {
                "__name__": "__main__",
                "__builtins__": builtins,
                "__rlm_repl__": self,
                "context": None,
                "state": _json_copy(self._last_good_state),
                "answer": {"content": "", "ready": False},
            }
        )
        self.bind_functions()

    def bind_functions(self) -> None:
        """(Re)bind the names of `API_NAMES` in the namespace."""
        self.namespace.update(
            {
                "llm_query": self.llm_query,
                "llm_query_batched": self.llm_query_batched,
                "rlm_query": self.rlm_query,
                "rlm_query_batched": self.rlm_query_batched,
                "SHOW_VARS": self.show_vars,
                "FINAL": self.final_answer,
                "FINAL_VAR": self.final_var,
                "LLMQueryError": LLMQueryError,
                "StateError": StateError,
                "call_tool": self.call_tool,
            }
        )

    # calls ---------------------------------------------------------------------------------

    def llm_query(self, prompt: Any, model: str | None = None) -> str:
        """One sub-LLM call; returns its text or raises LLMQueryError."""
        return self._answers(self._send([self._call(prompt, model, "llm")]), False)[0]

    def llm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Many sub-LLM calls, answered in parallel by the host; answers in prompt order."""
        calls = [self._call(p, model, "llm") for p in _prompt_list(prompts)]
        return self._answers(self._send(calls), True) if calls else []

    def rlm_query(self, prompt: Any, model: str | None = None) -> str:
        """A sub-RLM (depth + 1) that starts from this REPL's `state`; its changes merge back."""
        return self._rlm([prompt], model, False)[0]

    def rlm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Sub-RLMs in parallel, each from the same `state`; changes merge in prompt order."""
        return self._rlm(_prompt_list(prompts), model, True)

    def call_tool(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """A host-side tool of the run, by name: its (JSON) result, or LLMQueryError.

        The arguments travel as JSON (TypeError here if they are not JSON values); the tool
        runs on the host, where the RLM runs, never in this sandbox."""
        if not isinstance(name, str):
            raise TypeError("call_tool: the tool's name must be a str")
        try:
            arguments = json.dumps({"args": list(args), "kwargs": kwargs}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"tool {name!r}: arguments must be JSON values ({exc})") from None
        call = {
            "prompt": arguments,
            "depth": self.depth + 1,
            "params": {"kind": "tool", "tool": name},
        }
        text = self._answers(self._send([call]), False)[0]
        try:
            return json.loads(text)
        except ValueError:
            raise LLMQueryError("tool_failed", f"tool {name!r} answered with no JSON") from None

    def _rlm(self, prompts: list[Any], model: str | None, batched: bool) -> list[str]:
        calls = [self._call(p, model, "rlm") for p in prompts]
        if not calls:
            return []
        live = self._live_state()
        sent = check_state(live, self.state_max_bytes)
        for call in calls:
            call["state"] = sent
        if self.max_depth is not None and self.depth + 1 >= self.max_depth:
            message = (
                f"rlm_query is not allowed at depth {self.depth} (max_depth {self.max_depth}); "
                "use llm_query"
            )
            refused = {"status": "error", "error": {"code": "max_depth", "message": message}}
            results: list[dict[str, Any]] = [refused for _ in calls]
        else:
            results = self._send(calls)
        # Children that answered merge their changes even if another prompt failed.
        for result in results:
            if result.get("status") == "done":
                merge_state(live, sent, result.get("state"))
        return self._answers(results, batched)

    def _call(self, prompt: Any, model: str | None, kind: str) -> dict[str, Any]:
        if model is not None and not isinstance(model, str):
            raise TypeError("model must be a str or None")
        call: dict[str, Any] = {"depth": self.depth + 1, "params": {"kind": kind}}
        if isinstance(prompt, str):
            call["prompt"] = prompt
        elif isinstance(prompt, list) and all(is_message(m) for m in prompt):
            call["messages"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise TypeError("a prompt is a str or a list of {'role': str, 'content': str} dicts")
        chosen = model if model is not None else self.default_model
        if chosen is not None:
            call["model"] = chosen
        return call

    def _send(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = self.transport.send(calls)
        with self._sub_calls_lock:
            self._sub_calls.extend(
                {"id": r["id"], "usage": r["usage"]}
                for r in results
                if isinstance(r.get("id"), str) and isinstance(r.get("usage"), dict)
            )
        return results

    def _answers(self, results: list[dict[str, Any]], batched: bool) -> list[str]:
        """The responses, or the first failure as LLMQueryError (with the others if batched)."""
        answers = [_response(r) for r in results]
        if None not in answers:
            return [a for a in answers if a is not None]
        index = answers.index(None)
        failed = results[index]
        raw = failed.get("error")
        error: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        code = str(error.get("code", "error"))
        message = str(error.get("message", f"request ended as {failed.get('status')}"))
        if not batched:
            raise LLMQueryError(code, message)
        raise LLMQueryError(code, message, index=index, partial=answers)

    def _live_state(self) -> dict[str, Any]:
        # The code may have rebound `state` to a new dict: that one is the state now.
        state = self.namespace.get("state")
        if not isinstance(state, dict):
            raise StateError(f"state must be a dict of JSON values, not {type(state).__name__}")
        return state

    # finishing -----------------------------------------------------------------------------

    def final_answer(self, value: Any) -> Any:
        """FINAL(x): end the run with `x` as the answer; returns `x`."""
        self.final = {"value": _text(value), "source": "FINAL"}
        return value

    def final_var(self, name_or_value: Any) -> Any:
        """FINAL_VAR("name"): end the run with the variable `name` as the answer; returns it.

        A str is always a name: one that names no variable raises NameError, and nothing
        becomes the answer. Any other value is the answer itself.
        """
        if isinstance(name_or_value, str):
            name = name_or_value.strip()
            if not is_user_name(name) or name not in self.namespace:
                raise NameError(
                    f"FINAL_VAR: no variable named {name!r}; assign the answer to a variable "
                    "and pass its name, or use FINAL(value)"
                )
            value = self.namespace[name]
            self.final = {"value": _text(value), "source": "FINAL_VAR", "name": name}
            return value
        self.final = {"value": _text(name_or_value), "source": "FINAL_VAR"}
        for name, value in self.namespace.items():
            if value is name_or_value and is_user_name(name):
                self.final["name"] = name
                break
        return name_or_value

    def variables(self) -> list[dict[str, Any]]:
        """The model's variables (modules left out): name, type, size and a short preview.

        `context_0` is left out while it is `context` itself (one context, listed once)."""
        context = self.namespace.get("context")
        return [
            {
                "name": name,
                "type": type(value).__name__,
                "size": len(value) if isinstance(value, _SIZED) else None,
                "preview": _preview.repr(value)[:200],
            }
            for name, value in list(self.namespace.items())
            if is_user_name(name)
            and not isinstance(value, types.ModuleType)
            and not _is_tool_function(value)
            and not (name == "context_0" and value is context)
        ]

    def show_vars(self) -> str:
        """SHOW_VARS(): one line per variable, `name: type = preview`."""
        lines = [f"{v['name']}: {v['type']} = {v['preview']}" for v in self.variables()]
        return _Listing("\n".join(lines) if lines else "(no variables)")

    def take_final(self) -> dict[str, Any] | None:
        """FINAL/FINAL_VAR of the last execution, else the `answer` dict once ready, else None."""
        if self.final is not None:
            return self.final
        answer = self.namespace.get("answer")
        if isinstance(answer, dict) and answer.get("ready") is True:
            return {"value": _text(answer.get("content", "")), "source": "answer"}
        return None

    # running code --------------------------------------------------------------------------

    def load_context(self, value: Any, index: int = 0) -> None:
        """Bind `context_<index>` (str, list of str, or dict) without passing it through code.

        `context` is `context_0`, as in the official RLM library: a conversation's later
        turns add `context_1`, `context_2`, ... and the first stays where code expects it.
        """
        if not isinstance(index, int) or not 0 <= index < MAX_CONTEXTS:
            raise ValueError(f"a context index is an int from 0 to {MAX_CONTEXTS - 1}")
        self.namespace[f"context_{index}"] = value
        if index == 0:
            self.namespace["context"] = value

    def set_state(self, state: Any) -> None:
        """Replace `state` (a dict of JSON values within the bound; else StateError)."""
        self._last_good_state = check_state(state, self.state_max_bytes)
        self.namespace["state"] = _json_copy(self._last_good_state)

    def snapshot_state(self) -> dict[str, Any]:
        """A JSON copy of `state`; the last valid one if the code left it invalid."""
        with contextlib.suppress(StateError):
            self._last_good_state = check_state(self._live_state(), self.state_max_bytes)
        return _json_copy(self._last_good_state)

    def execute(
        self, code: str, timeout_s: float | None = None, *, output_max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Run `code` in the namespace; the fields of `rlm_wire.runtime_models.ExecutionResult`.

        Like a REPL, the value of a last bare expression is printed (its repr, unless None).
        Output is captured for this thread only (other threads print normally) and capped at
        `output_max_bytes` (UTF-8) per stream. The timeout raises KeyboardInterrupt inside the
        code from a timer: it stops Python loops but not a blocking C call, which is
        interrupted only when that call returns. Any other KeyboardInterrupt of the code is
        reported as its error (a sandbox host interrupts that way).
        """
        limit = output_max_bytes if output_max_bytes is not None else self.output_max_bytes
        out, err = _CappedText(limit), _CappedText(limit)
        with self._sub_calls_lock:
            self._sub_calls = []
        self.final = None
        self.cells += 1
        filename = f"{CELL_PREFIX}{self.cells}>"
        error: dict[str, Any] | None = None
        timer = _Timer()
        started = time.perf_counter()
        try:
            with _captured(out, err), _interrupt_after(timeout_s, timer):
                try:
                    self._run_cell(code, filename)
                except BaseException as exc:  # noqa: BLE001 - the model's errors are its output
                    error = describe_error(exc)
        except KeyboardInterrupt:
            if not timer.fired:
                raise
            error = {"type": "KeyboardInterrupt", "message": "", "traceback": None}
        if timer.fired and error is not None and error["type"] == "KeyboardInterrupt":
            error = {
                "type": "TimeoutError",
                "message": f"execution exceeded {timeout_s} s and was interrupted",
                "traceback": None,
            }
        try:
            self._last_good_state = check_state(self._live_state(), self.state_max_bytes)
        except StateError as exc:
            error = error or {"type": "StateError", "message": str(exc), "traceback": None}
        return {
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "error": error,
            "final": self.take_final(),
            "duration_ms": (time.perf_counter() - started) * 1000,
            "memory_bytes": 0,
            "state": _json_copy(self._last_good_state),
            "sub_calls": self._take_sub_calls(),
        }

    def _run_cell(self, code: str, filename: str) -> None:
        remember_source(filename, code)
        tree = ast.parse(code, filename, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if tree.body:
            exec(compile(tree, filename, "exec"), self.namespace)  # noqa: S102 - the point
        if isinstance(last, ast.Expr):
            expression = compile(ast.Expression(last.value), filename, "eval")
            value = eval(expression, self.namespace)  # noqa: S307 - the cell's last expression
            if value is not None:
                print(repr(value))

    def _take_sub_calls(self) -> list[dict[str, Any]]:
        """The answered sub-calls of the execution that just ran, for the host's accounting."""
        with self._sub_calls_lock:
            taken, self._sub_calls = self._sub_calls, []
        return taken


def _response(result: Mapping[str, Any]) -> str | None:
    response = result.get("response")
    return response if result.get("status") == "done" and isinstance(response, str) else None


def _prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, list | tuple):
        return list(prompts)
    raise TypeError("prompts must be a list of prompts")


def is_message(message: Any) -> bool:
    """A chat message: a dict with a str `role` and a str `content`."""
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def build_namespace(
    transport: Transport | None = None,
    *,
    context: Any = None,
    depth: int | None = None,
    max_depth: int | None = None,
    state: Mapping[str, Any] | None = None,
    output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES,
) -> dict[str, Any]:
    """Globals for `exec` holding the REPL functions; the `Repl` is under `__rlm_repl__`.

    Without a transport, one is built from RLM_BROKER_URL and RLM_SESSION_TOKEN (optional:
    RLM_BROKER_WAIT_S, RLM_CALL_TIMEOUT_S, RLM_BROKER_RETRY_DEADLINE_S), and the depth from
    RLM_DEPTH / RLM_MAX_DEPTH (default 0 and 1: rlm_query refused); the bound of `state`
    from RLM_STATE_MAX_BYTES.
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
            retry=RetryPolicy(deadline_s=float(environ.get("RLM_BROKER_RETRY_DEADLINE_S", "60"))),
        )
    repl = Repl(
        transport,
        depth=depth if depth is not None else int(environ.get("RLM_DEPTH", "0")),
        max_depth=max_depth if max_depth is not None else int(environ.get("RLM_MAX_DEPTH", "1")),
        state_max_bytes=int(environ.get("RLM_STATE_MAX_BYTES", DEFAULT_STATE_MAX_BYTES)),
        state=state,
        output_max_bytes=output_max_bytes,
    )
    repl.load_context(context)
    return repl.namespace


# --- reporting errors --------------------------------------------------------------------


def remember_source(filename: str, source: str) -> None:
    """Make `source` visible to tracebacks and `inspect` under its pseudo file name."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def describe_error(exc: BaseException) -> dict[str, Any]:
    """The `ExecutionError` fields (type, message, traceback) of an error of model code.

    The traceback starts at the cell and leaves out this module's frames (the REPL functions
    are not the model's code); the REPL's own errors show without their module name.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    first = next((i for i, f in enumerate(frames) if f.filename.startswith(CELL_PREFIX)), None)
    shown = [] if first is None else [f for f in frames[first:] if f.filename != __file__]
    lines = traceback.format_exception_only(type(exc), exc)
    lines[-1] = lines[-1].removeprefix(f"{__name__}.")
    if shown:
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(shown), *lines]
    text = "".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        half = MAX_TRACEBACK_CHARS // 2
        text = f"{text[:half]}\n[...]\n{text[-half:]}"
    return {"type": type(exc).__name__, "message": _safe_str(exc), "traceback": text}


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:MAX_MESSAGE_CHARS]
    except Exception:  # noqa: BLE001 - a model's __str__ may raise anything; the type suffices
        return f"<unprintable {type(exc).__name__}>"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(value))
    return copy


# --- output capture and timeouts ---------------------------------------------------------


class _CappedText(io.TextIOBase):
    """Keeps the first `limit` bytes (UTF-8) written to it and counts the rest."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit, self._kept, self.dropped = limit, 0, 0
        self._parts: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = self._limit - self._kept
        if room <= 0:
            # Counting characters, not bytes, keeps a flood cheap; the marker says "about".
            self.dropped += len(text)
            return len(text)
        data = text.encode("utf-8", "replace")
        if len(data) <= room:
            self._parts.append(text)
            self._kept += len(data)
        else:
            self._parts.append(data[:room].decode("utf-8", "ignore"))
            self._kept = self._limit
            self.dropped += len(data) - room
        return len(text)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.dropped:
            text += f"\n[output truncated: about {self.dropped} more bytes dropped]\n"
        return text


class _Stream(Protocol):
    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/stderr: writes of a capturing thread go to its buffer."""

    local = threading.local()

    def __init__(self, which: str, fallback: _Stream) -> None:
        self.which, self.fallback = which, fallback

    def _target(self) -> _Stream:
        target: _Stream | None = getattr(self.local, self.which, None)
        return target if target is not None else self.fallback

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False


_install_lock = threading.Lock()


@contextlib.contextmanager
def _captured(out: _Stream, err: _Stream) -> Iterator[None]:
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
    import ctypes

    target = ctypes.py_object(exc) if exc is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


# --- serve mode: one namespace, JSON lines ---------------------------------------------

DEFAULT_SERVE_LINE_BYTES = 64 << 20
_SERVE_KEYS = frozenset({"code", "timeout_s", "output_bytes", "context", "context_index", "state"})
_CODE_KEYS = frozenset({"code", "timeout_s", "output_bytes"})


def protocol_streams() -> tuple[io.BufferedReader, io.BufferedWriter]:
    """Private copies of fds 0 and 1 for the protocol; then fd 0 reads /dev/null and fd 1
    writes to fd 2, so nothing model code reads or prints (C libraries and child processes
    included) can take a request or slip a line into the replies."""
    sys.stdout.flush()
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return requests, replies


def serve(
    repl: Repl,
    requests: io.BufferedIOBase,
    replies: io.BufferedIOBase,
    *,
    max_line_bytes: int = DEFAULT_SERVE_LINE_BYTES,
    default_timeout_s: float | None = None,
) -> int:
    """Answer one JSON line per request line until EOF (see the module docstring)."""
    while True:
        line = requests.readline(max_line_bytes + 1)
        if not line:
            return 0
        if len(line.rstrip(b"\n")) > max_line_bytes:
            while line and not line.endswith(b"\n"):
                line = requests.readline(1 << 16)  # drop the rest of the oversized line
            reply: dict[str, Any] = {
                "protocol_error": f"request line over {max_line_bytes} bytes: dropped"
            }
        else:
            reply = _serve_one(repl, line, default_timeout_s)
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


def _serve_one(repl: Repl, line: bytes, default_timeout_s: float | None) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {"protocol_error": f"request is not JSON: {exc}"}
    if not isinstance(request, dict) or not request or set(request) - _SERVE_KEYS:
        return {
            "protocol_error": "a request is a JSON object holding `code` (with `timeout_s`, "
            "`output_bytes`), or `context` (with `context_index`) and/or `state`"
        }
    if "code" in request:
        code, timeout_s = request["code"], request.get("timeout_s", default_timeout_s)
        output_bytes = request.get("output_bytes")
        if not isinstance(code, str) or set(request) - _CODE_KEYS:
            return {"protocol_error": "`code` must be a str, with `timeout_s`, `output_bytes`"}
        if timeout_s is not None and not _positive(timeout_s):
            return {"protocol_error": "`timeout_s` must be a positive number"}
        if output_bytes is not None and not (_positive(output_bytes) and type(output_bytes) is int):
            return {"protocol_error": "`output_bytes` must be a positive integer"}
        return repl.execute(code, timeout_s=timeout_s, output_max_bytes=output_bytes)
    if set(request) & _CODE_KEYS:
        return {"protocol_error": "`timeout_s` and `output_bytes` go with `code`"}
    if "state" in request:
        try:
            repl.set_state(request["state"])
        except StateError as exc:
            return {"protocol_error": str(exc)}
    if "context" in request:
        try:
            repl.load_context(request["context"], request.get("context_index", 0))
        except ValueError as exc:
            return {"protocol_error": str(exc)}
    return {"ok": True}


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


# --- script entry ------------------------------------------------------------------------


def _load_json_or_text(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        return json.loads(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """`python rlm_repl.py FILE | -c CODE | --serve [--context F] [--state F] [--result F]`."""
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="Python file to run")
    source.add_argument("-c", dest="code", help="Python code to run")
    source.add_argument(
        "--serve", action="store_true", help="run requests from stdin (JSON lines), keeping state"
    )
    parser.add_argument("--context", help="file loaded as `context` (.json parsed, else text)")
    parser.add_argument("--state", help="JSON file: the initial `state` dict")
    parser.add_argument("--result", help="write {stdout, stderr, error, final, state} as JSON")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per execution")
    parser.add_argument(
        "--output-bytes", type=int, default=DEFAULT_OUTPUT_MAX_BYTES, help="cap per stream"
    )
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_SERVE_LINE_BYTES,
        help="--serve: bound of one request line",
    )
    args = parser.parse_args(argv)
    state = _load_json_or_text(args.state) if args.state else None
    namespace = build_namespace(
        context=_load_json_or_text(args.context) if args.context else None,
        state=state,
        output_max_bytes=args.output_bytes,
    )
    repl: Repl = namespace["__rlm_repl__"]
    if args.serve:
        requests, replies = protocol_streams()
        return serve(
            repl,
            requests,
            replies,
            max_line_bytes=args.max_line_bytes,
            default_timeout_s=args.timeout,
        )
    code = args.code
    if code is None:
        with open(args.file, encoding="utf-8") as handle:
            code = handle.read()
    outcome = repl.execute(code, timeout_s=args.timeout)
    sys.stdout.write(outcome["stdout"])
    sys.stderr.write(outcome["stderr"])
    error = outcome["error"]
    if error is not None:
        sys.stderr.write(error["traceback"] or f"{error['type']}: {error['message']}\n")
    if args.result:
        keep = {k: outcome[k] for k in ("stdout", "stderr", "error", "final", "state")}
        with open(args.result, "w", encoding="utf-8") as handle:
            json.dump(keep, handle)
    return 1 if error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
