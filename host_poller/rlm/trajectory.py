"""The JSONL trajectory of a run: one JSON object per line, one event each.

Events: `run_start`, `iteration` (reply, code, outputs, usage, latency), `sub_call`
(depth, kind, model, usage, latency), `run_end` (answer, stop reason, usage). Every event
carries `run_id`, `depth` and `t` (Unix time); sub-RLMs running in the same process write
into their run's file, so one file replays the whole tree. No secret is ever written, but
tenants' prompts and outputs are: files are created private to this user (0600, directories
0700), never through a symbolic link.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from host_poller.private_files import open_private, private_dirs


class TrajectoryWriter:
    """Appends events to one JSONL file; thread-safe; each line is flushed as written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dirs(path.parent)
        self._lock = threading.Lock()
        self._file: TextIO | None = open_private(path, "a")

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": round(time.time(), 6), **fields}
        line = json.dumps(record, default=str, ensure_ascii=False)
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_trajectory(path: Path) -> list[dict[str, Any]]:
    """All events of a trajectory file, in order."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
