"""The usage ledger: one row per LLM call, summed per tenant, session, run, model and depth.

Each call records its own `Usage` (never a shared "last usage"), so concurrent calls sum
exactly. Backed by SQLite (stdlib): in memory, or a WAL-mode file that several processes and
`rlm usage` read and write at once. Writes are a single small INSERT, fast enough to make
from the event loop. The file holds tenants' usage: it is created private (0600, in a
directory created 0700, never through a symbolic link); SQLite gives its -wal and -shm files
the database file's mode.

Bounded by folding: with `detail_days`, calls older than that are folded into one row per
UTC day and per tenant, session, run, model and depth (`llm_usage_daily`), one day per
transaction, in a background thread at most once an hour (`fold_soon`). Every total and
grouping stays exact (the two tables are summed together); what goes is each call's own time
within its day. The ledger then grows with runs and days, not with calls (a run of 250
sub-calls of one model at one depth keeps one row a day).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from host_poller.llm.types import Usage
from host_poller.private_files import create_private

logger = logging.getLogger(__name__)

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
# Folded calls. A dimension a call did not have is '' here (NULLs would never conflict in
# the key), and NULL again in `_ALL_ROWS`.
_DAILY_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_usage_daily (
    day REAL NOT NULL,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    model TEXT NOT NULL,
    depth INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (day, tenant_id, session_id, run_id, model, depth)
)
"""
_ALL_ROWS = """(
SELECT tenant_id, session_id, run_id, model, depth, input_tokens, output_tokens, cost_usd, calls
FROM llm_usage
UNION ALL
SELECT NULLIF(tenant_id, ''), NULLIF(session_id, ''), NULLIF(run_id, ''), model, depth,
       input_tokens, output_tokens, cost_usd, calls
FROM llm_usage_daily
)"""
_SUMS = (
    "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
    "COALESCE(SUM(cost_usd), 0.0), COALESCE(SUM(calls), 0)"
)
_DAY_S = 86400
_FOLD_DAY = """
INSERT INTO llm_usage_daily (day, tenant_id, session_id, run_id, model, depth,
                             input_tokens, output_tokens, cost_usd, calls)
SELECT ?, COALESCE(tenant_id, ''), COALESCE(session_id, ''), COALESCE(run_id, ''), model, depth,
       SUM(input_tokens), SUM(output_tokens), SUM(cost_usd), SUM(calls)
FROM llm_usage WHERE recorded_at >= ? AND recorded_at < ?
GROUP BY tenant_id, session_id, run_id, model, depth
ON CONFLICT (day, tenant_id, session_id, run_id, model, depth) DO UPDATE SET
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    cost_usd = cost_usd + excluded.cost_usd,
    calls = calls + excluded.calls
"""
#: `fold_soon` starts a fold at most this often per ledger.
FOLD_EVERY_S = 3600.0
_BUSY_TIMEOUT_S = 10.0


def _check_dimensions(names: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected some of {list(DIMENSIONS)}")


class UsageLedger:
    """Usage of LLM calls; `path=None` keeps it in memory, else in a shared SQLite file.
    With `detail_days`, older calls are folded per day (see the module's docstring)."""

    def __init__(self, path: Path | None = None, *, detail_days: float | None = None) -> None:
        self.path = path
        self.detail_days = detail_days
        self._lock = threading.Lock()
        self._folding = threading.Lock()  # one fold at a time
        self._last_fold = -FOLD_EVERY_S
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
        self._db.execute(_DAILY_SCHEMA)
        # Folding finds and removes calls by time.
        self._db.execute("CREATE INDEX IF NOT EXISTS llm_usage_time ON llm_usage (recorded_at)")
        self.fold_soon()

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
        self.fold_soon()

    def fold_soon(self) -> None:
        """`fold` in a background thread (in this one for a ledger in memory), unless this
        ledger started one less than FOLD_EVERY_S ago; nothing without `detail_days`."""
        now = time.monotonic()
        if self.detail_days is None or now - self._last_fold < FOLD_EVERY_S:
            return
        self._last_fold = now
        if self.path is None:
            self.fold()
        else:
            threading.Thread(target=self._fold_logged, name="ledger-fold", daemon=True).start()

    def fold(self, now: float | None = None) -> int:
        """Fold the calls recorded more than `detail_days` before `now` into daily rows, one
        day per transaction, oldest first; the days folded. A file ledger folds through a
        connection of its own: between two days, calls are recorded as usual."""
        if self.detail_days is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.detail_days * _DAY_S
        with self._folding:
            if self.path is None:
                with self._lock:
                    return _fold(self._db, cutoff)
            db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                return _fold(db, cutoff)
            finally:
                db.close()

    def _fold_logged(self) -> None:
        try:
            days = self.fold()
        except sqlite3.Error as exc:  # retried at the next fold_soon
            extra = {"path": str(self.path), "error": str(exc)}
            logger.warning("usage ledger fold failed", extra=extra)
        else:
            if days:
                logger.info("usage ledger folded", extra={"path": str(self.path), "days": days})

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
        sql = f"SELECT {select} FROM {_ALL_ROWS} WHERE {where}"  # noqa: S608
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
        with self._folding, self._lock:  # a fold under way finishes its day first
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


def _fold(db: sqlite3.Connection, cutoff: float) -> int:
    """Fold every whole day of `db`'s calls before `cutoff`'s day, oldest first."""
    days = 0
    limit = cutoff // _DAY_S * _DAY_S  # a day is folded once it is wholly past the cutoff
    while True:
        (first,) = db.execute(
            "SELECT MIN(recorded_at) FROM llm_usage WHERE recorded_at < ?", (limit,)
        ).fetchone()
        if first is None:
            return days
        day = first // _DAY_S * _DAY_S
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_FOLD_DAY, (day, day, day + _DAY_S))
            db.execute(
                "DELETE FROM llm_usage WHERE recorded_at >= ? AND recorded_at < ?",
                (day, day + _DAY_S),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        days += 1
