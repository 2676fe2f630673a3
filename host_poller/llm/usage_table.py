"""Render ledger totals as a terminal table (for `rlm usage`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from host_poller.llm.types import Usage


def render_usage_table(
    rows: Sequence[tuple[dict[str, Any], Usage]],
    group_by: Sequence[str],
    console: Console | None = None,
) -> None:
    """Print one line per group plus a total line."""
    table = Table(title="LLM usage")
    for name in group_by:
        table.add_column(name)
    for name in ("calls", "input tokens", "output tokens", "cost (USD)"):
        table.add_column(name, justify="right")
    grand = Usage()
    for keys, totals in rows:
        grand = grand + totals
        cells = ["-" if keys[name] is None else str(keys[name]) for name in group_by]
        table.add_row(*cells, *_numbers(totals))
    if group_by:
        table.add_section()
        table.add_row("total", *([""] * (len(group_by) - 1)), *_numbers(grand))
    (console or Console()).print(table)


def _numbers(usage: Usage) -> list[str]:
    return [
        f"{usage.calls:,}",
        f"{usage.input_tokens:,}",
        f"{usage.output_tokens:,}",
        f"{usage.cost_usd:.6f}",
    ]
