"""`rlm ask`'s lines for a person: rich's console on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import os
import pty

import pytest
from rich.console import Console

from rlm_cli.printer import PlainPrinter, printer_for


@pytest.fixture(autouse=True)
def _no_rich_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)


def test_a_pipe_gets_each_text_as_one_plain_line() -> None:
    stream = io.StringIO()
    printer = printer_for(stream)
    assert isinstance(printer, PlainPrinter) and not printer.is_terminal
    long = "final: " + "x" * 200 + " · trajectory /tmp/[run]/t.json"
    printer.print(long, style="dim")
    printer.print("[yellow]not markup here[/yellow]", style="yellow")
    # Not wrapped at 80 columns, nothing read as markup, no escape sequences.
    assert stream.getvalue() == f"{long}\n[yellow]not markup here[/yellow]\n"


def test_a_terminal_gets_richs_console() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", encoding="utf-8") as terminal:
            printer = printer_for(terminal)
            assert isinstance(printer, Console) and printer.is_terminal
            assert printer.file is terminal
    finally:
        os.close(leader)


@pytest.mark.parametrize(("variable", "value"), [("FORCE_COLOR", "1"), ("TTY_COMPATIBLE", "1")])
def test_richs_own_variables_still_decide(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    stream = io.StringIO()
    printer = printer_for(stream)
    assert isinstance(printer, Console) and printer.is_terminal
    printer.print("styled", style="bold")
    assert "\x1b[" in stream.getvalue()


def test_a_closed_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    stream.close()
    assert isinstance(printer_for(stream), PlainPrinter)
