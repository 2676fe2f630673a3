"""Typed, bounded access to the fields of a trajectory event.

Events are read back from files a tenant's run wrote, so no field is trusted to have the
shape the writer gives it: each accessor returns the field if it has the right type, else a
default, and text is cut to a bound before it leaves the viewer.
"""

from __future__ import annotations

import math
from typing import Any

Event = dict[str, Any]


def text(event: Event, key: str) -> str | None:
    value = event.get(key)
    return value if isinstance(value, str) else None


def number(event: Event, key: str) -> float | None:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def integer(event: Event, key: str) -> int | None:
    value = event.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def mapping(event: Event, key: str) -> dict[str, Any] | None:
    value = event.get(key)
    return value if isinstance(value, dict) else None


def usage(value: Any) -> dict[str, float]:
    """A usage dict (`Usage.to_wire()`): tokens and cost, zeros for what is missing."""
    found = value if isinstance(value, dict) else {}
    return {
        "input_tokens": number(found, "input_tokens") or 0,
        "output_tokens": number(found, "output_tokens") or 0,
        "cost_usd": number(found, "cost_usd") or 0.0,
        "calls": number(found, "calls") or 0,
    }


def add_usage(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in ("input_tokens", "output_tokens",
                                                            "cost_usd", "calls")}  # fmt: skip


def clip(value: str | None, limit: int) -> str | None:
    """`value` cut to `limit` characters, saying how much was left out."""
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}\n[... {len(value) - limit} more characters not shown]"
