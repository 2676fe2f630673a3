"""Where `rlm ask` writes the lines a person reads on stderr: rich's console on a terminal
(styles, the live status line), else plain lines.

Off a terminal rich only drops its styles (and wraps lines at 80 columns), yet importing it
and highlighting the first line cost 50-100 ms of `rlm ask`'s start-up, before its stack is
ready (docs/performance.md, "Start-up"): a pipe, a file or CI gets the same text, one line
each, without it. Where rich's own environment variables decide (FORCE_COLOR,
TTY_COMPATIBLE), rich is used and decides as before.
"""

from __future__ import annotations

import os
from typing import IO, Protocol


class Printer(Protocol):
    """What `rlm ask` needs of a console: rich's `Console` is one."""

    @property
    def file(self) -> IO[str]: ...

    @property
    def is_terminal(self) -> bool: ...

    def print(self, text: str, *, style: str | None = None) -> None: ...


class PlainPrinter:
    """Each text as one line on `file`, flushed; styles ignored, nothing parsed as markup."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    @property
    def file(self) -> IO[str]:
        return self._file

    @property
    def is_terminal(self) -> bool:
        return False

    def print(self, text: str, *, style: str | None = None) -> None:
        self._file.write(f"{text}\n")
        self._file.flush()


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except ValueError:  # closed
        return False


def printer_for(file: IO[str]) -> Printer:
    """rich's console on `file` when it is a terminal or rich's variables are set, else a
    `PlainPrinter`."""
    if _is_terminal(file) or "FORCE_COLOR" in os.environ or "TTY_COMPATIBLE" in os.environ:
        from rich.console import Console

        return Console(file=file)
    return PlainPrinter(file)
