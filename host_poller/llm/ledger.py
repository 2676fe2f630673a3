"""The usage ledger: one row per LLM call, summed per tenant, session, run, model and depth.

Each call records its own `Usage` (never a shared "last usage"), so concurrent calls sum
exactly. Backed by SQLite (stdlib): in memory, or a WAL-mode file that several processes and
`rlm usage` read and write at once. Writes are a single small INSERT, fast enough to make
from the event loop. The file holds tenants' usage: it is created private (0600, in a
directory created 0700, never through a symbolic link); SQLite gives its -wal and -shm files
the database file's mode.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from host_poller.llm.types import Usage
from host_poller.private_files import create_private

DIMENSIONS = ("tenant_id", "session_id", "run_id", "model", "depth")
"""The columns `totals` can group and filter by."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_usage (
    id INTEGER PRIMARY KEY,
    recorded_at REAL NOT NULL,
    tenant_id TEXT,
    session_id TEXT,
    run_id TEXT,
    model TEXT NOT NULL,
    depth INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    calls INTEGER NOT NULL
)
"""
_SUMS = (
    "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
    "COALESCE(SUM(cost_usd), 0.0), COALESCE(SUM(calls), 0)"
)
_BUSY_TIMEOUT_S = 10.0


def _check_dimensions(names: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected some of {list(DIMENSIONS)}")


class UsageLedger:
    """Usage of LLM calls; `path=None` keeps it in memory, else in a shared SQLite file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            create_private(path)
        self._db = sqlite3.connect(
            ":memory:" if path is None else str(path),
            timeout=_BUSY_TIMEOUT_S,
            check_same_thread=False,
            isolation_level=None,  # autocommit: each INSERT is its own transaction
        )
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: durable against a process crash, one fsync per checkpoint.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def record(
        self,
        *,
        usage: Usage,
        model: str,
        depth: int,
        tenant_id: str | None = None,
        session_id: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """Add one call's (or one aggregated run's) usage."""
        row = (
            time.time(), tenant_id, session_id, run_id, model, depth,
            usage.input_tokens, usage.output_tokens, usage.cost_usd, usage.calls,
        )  # fmt: skip
        with self._lock:
            self._db.execute(
                "INSERT INTO llm_usage (recorded_at, tenant_id, session_id, run_id, model, "
                "depth, input_tokens, output_tokens, cost_usd, calls) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def totals(
        self, *, group_by: Sequence[str] = (), **filters: str | int
    ) -> list[tuple[dict[str, Any], Usage]]:
        """Sums per group, ordered by the group keys; filters are equality on DIMENSIONS."""
        group = list(group_by)
        _check_dimensions(group, "group_by")
        _check_dimensions(list(filters), "filters")
        # Column names are checked against DIMENSIONS above, so formatting them in is safe.
        where = " AND ".join(f"{name} = ?" for name in filters) or "1"
        columns = ", ".join(group)
        select = f"{columns}, {_SUMS}" if group else _SUMS
        sql = f"SELECT {select} FROM llm_usage WHERE {where}"  # noqa: S608
        if group:
            sql += f" GROUP BY {columns} ORDER BY {columns}"
        with self._lock:
            rows = self._db.execute(sql, tuple(filters.values())).fetchall()
        out: list[tuple[dict[str, Any], Usage]] = []
        for row in rows:
            keys = dict(zip(group, row[: len(group)], strict=True))
            inp, outp, cost, calls = row[len(group) :]
            if not group and calls == 0:
                continue
            out.append((keys, Usage(int(inp), int(outp), float(cost), int(calls))))
        return out

    def total(self, **filters: str | int) -> Usage:
        """The sum over all rows matching `filters`."""
        rows = self.totals(group_by=(), **filters)
        return rows[0][1] if rows else Usage()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
