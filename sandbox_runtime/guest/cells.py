"""Running one cell of code like a REPL does, and describing what it raised."""

from __future__ import annotations

import ast
import linecache
import sys
import traceback
from types import TracebackType
from typing import Any

MAX_TRACEBACK_CHARS = 20_000


def remember_source(filename: str, source: str) -> None:
    """Make the source visible to tracebacks and `inspect` under its pseudo file name."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def run_cell(source: str, filename: str, namespace: dict[str, Any]) -> list[ast.stmt]:
    """Execute `source` in `namespace`; echo the value of a final bare expression.

    Returns the cell's top-level statements (the caller records definitions from them).
    """
    remember_source(filename, source)
    tree = ast.parse(source, filename, "exec")
    body = list(tree.body)
    last: ast.expr | None = None
    if body and isinstance(body[-1], ast.Expr):
        last = body.pop().value  # type: ignore[attr-defined]
    if body:
        module = ast.Module(body=body, type_ignores=[])
        exec(compile(module, filename, "exec"), namespace)  # noqa: S102 -- running the cell is the point
    if last is not None:
        value = eval(compile(ast.Expression(last), filename, "eval"), namespace)  # noqa: S307
        if value is not None:
            print(repr(value))
    return list(tree.body)


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Drop the guest's own frames in front of the first frame of user code."""
    cursor = tb
    while cursor is not None:
        name = cursor.tb_frame.f_code.co_filename
        if name.startswith("<cell-") or name.startswith("<restored-"):
            return cursor
        cursor = cursor.tb_next
    return tb


def describe(exc: BaseException) -> dict[str, str]:
    """The ExecutionError fields for an exception raised by user code."""
    if isinstance(exc, SyntaxError):
        lines = traceback.format_exception_only(type(exc), exc)
    else:
        lines = traceback.format_exception(type(exc), exc, _user_traceback(exc.__traceback__))
    text = "".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        text = text[: MAX_TRACEBACK_CHARS // 2] + "\n[...]\n" + text[-MAX_TRACEBACK_CHARS // 2 :]
    return {"type": type(exc).__name__, "message": _safe_str(exc), "traceback": text}


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:4000]
    except Exception:  # noqa: BLE001 -- a user __str__ may raise anything; the type name suffices
        return f"<unprintable {type(exc).__name__}>"


def restore_stdio(stdout: Any, stderr: Any) -> None:
    sys.stdout = stdout
    sys.stderr = stderr
