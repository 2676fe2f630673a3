"""The list of runs: one summary per run id, over every file that holds its events.

A run's parts may sit in several files (the root's, and those of sub-RLMs run by other
pollers), so files are summarised one by one and the summaries merged by the events' own
`run_id`. A file's summary is kept while its size and modification time stay the same, so
a listing re-reads only the files that changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from host_poller.viewer import events as ev
from host_poller.viewer.reader import FileEvents, TrajectoryDir, TrajectoryFile

#: Characters of the query and answer shown in the list.
PREVIEW_CHARS = 200


@dataclass
class RunSummary:
    """What the list shows of one run; `merge` adds another file's part."""

    run_id: str
    tenants: set[str | None] = field(default_factory=set)
    files: int = 0
    has_root: bool = False
    """The run's `run_start` was seen: its root ran on this host."""
    started: float | None = None
    first_t: float | None = None
    last_t: float | None = None
    model: str | None = None
    query: str | None = None
    iterations: int = 0
    sub_call_events: int = 0
    sub_calls_reported: int = 0
    depth: int = 0
    run_usage: dict[str, float] | None = None
    """The run's usage as the root last saw it: `run_end`, else its last iteration."""
    own_usage: dict[str, float] = field(default_factory=lambda: ev.usage(None))
    stop_reason: str | None = None
    answer: str | None = None
    error: str | None = None
    truncated: bool = False

    def add(self, event: ev.Event) -> None:
        kind = event["event"]
        t = ev.number(event, "t")
        depth = ev.integer(event, "depth") or 0
        if t is not None:
            self.first_t = t if self.first_t is None else min(self.first_t, t)
            self.last_t = t if self.last_t is None else max(self.last_t, t)
        self.depth = max(self.depth, depth)
        root = depth == 0 and event.get("request_id") is None
        if kind == "run_start" and root:
            self.has_root = True
            self.started = t
            self.model = ev.text(event, "model")
            self.query = ev.clip(ev.text(event, "query"), PREVIEW_CHARS)
        elif kind == "iteration":
            self.own_usage = ev.add_usage(self.own_usage, ev.usage(event.get("usage")))
            if root:
                self.iterations += 1
                self.sub_calls_reported = max(
                    self.sub_calls_reported, ev.integer(event, "sub_calls") or 0
                )
                if "run_usage" in event:
                    self.run_usage = ev.usage(event.get("run_usage"))
        elif kind == "last_call_reply":
            self.own_usage = ev.add_usage(self.own_usage, ev.usage(event.get("usage")))
        elif kind == "sub_call":
            self.sub_call_events += 1
        elif kind == "run_end" and root:
            self.stop_reason = ev.text(event, "stop_reason")
            self.answer = ev.clip(ev.text(event, "answer"), PREVIEW_CHARS)
            self.run_usage = ev.usage(event.get("usage"))
        elif kind == "error" and root:
            self.error = ev.clip(ev.text(event, "error"), PREVIEW_CHARS)

    def merge(self, other: RunSummary) -> None:
        self.tenants |= other.tenants
        self.files += other.files
        self.truncated |= other.truncated
        if other.has_root:
            self.has_root = True
            self.started, self.model, self.query = other.started, other.model, other.query
            self.iterations = other.iterations
            self.sub_calls_reported = other.sub_calls_reported
            self.run_usage = other.run_usage
            self.stop_reason, self.answer = other.stop_reason, other.answer
            self.error = other.error
        for t in (other.first_t, other.last_t):
            if t is not None:
                self.first_t = t if self.first_t is None else min(self.first_t, t)
                self.last_t = t if self.last_t is None else max(self.last_t, t)
        self.sub_call_events += other.sub_call_events
        self.depth = max(self.depth, other.depth)
        self.own_usage = ev.add_usage(self.own_usage, other.own_usage)

    @property
    def status(self) -> str:
        if self.stop_reason is not None:
            return self.stop_reason
        if self.error is not None:
            return "error"
        return "incomplete" if self.has_root else "parts only"

    @property
    def sort_key(self) -> float:
        return self.started or self.first_t or 0.0

    def to_json(self) -> dict[str, Any]:
        usage = self.run_usage if self.run_usage is not None else self.own_usage
        return {
            "run_id": self.run_id,
            "tenants": sorted(t or "" for t in self.tenants),
            "files": self.files,
            "has_root": self.has_root,
            "started": self.sort_key or None,
            "ended": self.last_t,
            "model": self.model,
            "query": self.query,
            "iterations": self.iterations,
            "sub_calls": max(self.sub_call_events, self.sub_calls_reported),
            "depth": self.depth,
            "tokens": int(usage["input_tokens"] + usage["output_tokens"]),
            "cost_usd": usage["cost_usd"],
            "status": self.status,
            "answer": self.answer,
            "error": self.error,
            "truncated": self.truncated,
        }


def summarize(part: FileEvents) -> dict[str, RunSummary]:
    """One summary per run id found in a file's events."""
    found: dict[str, RunSummary] = {}
    for event in part.events:
        run_id = ev.text(event, "run_id")
        if run_id is None:
            continue
        summary = found.get(run_id)
        if summary is None:
            summary = found[run_id] = RunSummary(
                run_id, tenants={part.file.tenant}, files=1, truncated=part.truncated
            )
        summary.add(event)
    return found


@dataclass(frozen=True)
class RunPage:
    runs: list[dict[str, Any]]
    total: int
    files_left_out: int


class RunIndex:
    """Summaries of the runs in a trajectory directory; safe to use from several threads."""

    def __init__(self, directory: TrajectoryDir) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._by_file: dict[TrajectoryFile, dict[str, RunSummary]] = {}

    def summaries(self) -> tuple[dict[str, RunSummary], dict[str, list[TrajectoryFile]], int]:
        """(summary by run id, the files of each run id, files left out past the cap)."""
        scan = self.directory.scan()
        with self._lock:
            cached = {f: self._by_file[f] for f in scan.files if f in self._by_file}
        for file in scan.files:
            if file not in cached:
                part = self.directory.read(file)
                cached[file] = summarize(part) if part is not None else {}
        with self._lock:
            # Only the files of the latest scan stay: the cache is bounded by `max_files`.
            self._by_file = cached
        merged: dict[str, RunSummary] = {}
        files: dict[str, list[TrajectoryFile]] = {}
        for file in scan.files:
            for run_id, part_summary in cached[file].items():
                files.setdefault(run_id, []).append(file)
                if run_id in merged:
                    merged[run_id].merge(part_summary)
                else:
                    copy = RunSummary(run_id)
                    copy.merge(part_summary)
                    merged[run_id] = copy
        return merged, files, scan.left_out

    def page(self, offset: int, limit: int) -> RunPage:
        """Runs newest first, `limit` of them from `offset`."""
        merged, _, left_out = self.summaries()
        ordered = sorted(merged.values(), key=lambda s: (s.sort_key, s.run_id), reverse=True)
        return RunPage(
            [s.to_json() for s in ordered[offset : offset + limit]], len(ordered), left_out
        )

    def files_of(self, run_id: str) -> tuple[RunSummary | None, list[TrajectoryFile]]:
        merged, files, _ = self.summaries()
        return merged.get(run_id), files.get(run_id, [])
