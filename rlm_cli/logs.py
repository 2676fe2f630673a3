"""Structured logging for every `rlm` process: one line per event, stdlib and structlog alike.

Only entry points call `configure_logging`; library modules use
`logging.getLogger(__name__)` and pass event fields through `extra=`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import structlog

_SECRET_FIELDS = frozenset({"token", "api_key", "authorization", "password", "secret"})


def _drop_secrets(
    _: Any, __: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Replace any field whose name says it holds a secret; a last line of defence."""
    for key in list(event_dict):
        if key.lower() in _SECRET_FIELDS:
            event_dict[key] = "[redacted]"
    return event_dict


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
    """Route stdlib logging (uvicorn, our modules) and structlog through one renderer."""
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
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
