"""Server-sent events as the tests read them: `(event name, JSON data)` pairs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def sse_events(lines: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each `data:` line with the `event:` name before it (`message` when none was given)."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = "message"
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events
