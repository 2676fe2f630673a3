"""Structured logging for every `rlm` process: one line per event.

Only entry points call `configure_logging`; library modules use
`logging.getLogger(__name__)` and pass event fields through `extra=`.

Each record becomes one event (`event`, `level`, `logger`, the `extra=` fields, `timestamp`,
`exception`), the fields structlog's stdlib chain made, rendered as one JSON object or, for a
person, by structlog's console renderer. The JSON lines are made here with the standard
library: `import structlog` imports its console renderer, which imports rich and pygments
(~0.1 s, a tenth of `rlm ask`'s start-up); structlog is imported for the first console line.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

_SECRET_FIELDS = frozenset({"token", "api_key", "authorization", "password", "secret"})

# What every record has: anything else on a record came through `extra=`.
_RECORD_FIELDS = frozenset(logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _drop_secrets(event: dict[str, Any]) -> dict[str, Any]:
    """Replace any field whose name says it holds a secret; a last line of defence."""
    for key in list(event):
        if key.lower() in _SECRET_FIELDS:
            event[key] = "[redacted]"
    return event


def _exc_info(value: Any) -> ExcInfo | None:
    """A record's `exc_info` as a triple, or None when it names no exception."""
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if (
        isinstance(value, tuple)
        and len(value) == 3
        and isinstance(value[0], type)
        and issubclass(value[0], BaseException)
        and isinstance(value[1], BaseException)
        and (value[2] is None or isinstance(value[2], TracebackType))
    ):
        return (value[0], value[1], value[2])
    if value:
        current = sys.exc_info()
        if current[0] is not None and current[1] is not None:
            return (current[0], current[1], current[2])
    return None


def _traceback_text(exc_info: ExcInfo) -> str:
    out = io.StringIO()
    traceback.print_exception(exc_info[0], exc_info[1], exc_info[2], None, out)
    return out.getvalue().removesuffix("\n")


def _event_of(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of one log line, in the order structlog's stdlib chain set them (`event`,
    the stack, `level`, `logger`, the `extra=` fields, `timestamp`; `exception` last), secrets
    redacted."""
    event: dict[str, Any] = {"event": record.getMessage()}
    if record.exc_info:
        event["exc_info"] = record.exc_info
    if record.stack_info:
        event["stack_info"] = record.stack_info
    level = record.levelname.lower()
    event["level"] = "warning" if level == "warn" else level
    event["logger"] = record.name
    for key, value in record.__dict__.items():
        if key not in _RECORD_FIELDS:
            event[key] = value
    now = datetime.datetime.now(tz=datetime.UTC)
    event["timestamp"] = now.isoformat().replace("+00:00", "Z")
    _drop_secrets(event)
    exc_info = _exc_info(event.pop("exc_info", None))
    if exc_info is not None:
        event["exception"] = _traceback_text(exc_info)
    return event


def _json_default(value: Any) -> Any:
    """What JSON cannot hold: the object's `__structlog__()` if it has one, else its repr."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_event_of(record), default=_json_default)


class ConsoleFormatter(logging.Formatter):
    """structlog's console renderer, without colours; structlog is imported for the first
    line (on a terminal `rlm` logs only warnings: most runs write none)."""

    def __init__(self) -> None:
        super().__init__()
        self._render: Callable[[Any, str, dict[str, Any]], str] | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._render is None:
            from structlog.dev import ConsoleRenderer

            self._render = ConsoleRenderer(colors=False)
        event = _event_of(record)
        return self._render(None, event["level"], event)


class Writable(Protocol):
    """Where log lines can go: a text stream, or rich's proxy above a live display."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class _Handler(logging.StreamHandler[Writable]):
    """The one handler `configure_logging` installs: stderr, unless `logs_written_to` says."""


@contextlib.contextmanager
def logs_written_to(stream: Writable) -> Iterator[None]:
    """Write the log lines to `stream` for the block: `rlm ask` prints them above its live
    status line this way, and a thread whose sys.stderr is captured cannot catch them."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, _Handler)]
    previous = [(h, h.setStream(stream)) for h in handlers]
    try:
        yield
    finally:
        for handler, old in previous:
            if old is not None:
                handler.setStream(old)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route stdlib logging (uvicorn, our modules) through one formatter."""
    formatter = ConsoleFormatter() if fmt == "console" else JsonFormatter()
    handler = _Handler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # One line per HTTP request (server access logs, client request logs) is too chatty at
    # INFO on the hot path: a poller would log every /pending and /respond.
    for name in ("uvicorn.access", "httpx2", "httpcore2", "openai._base_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
