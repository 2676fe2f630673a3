"""One run as a tree: its sessions (root and sub-RLMs), their iterations, its sub-calls and
a timeline, assembled from the events of all the files that hold the run.

What the trajectory says and what is inferred:
- a session is keyed by (`depth`, `request_id`): the root has no request id, a sub-RLM has
  the id of the `rlm_query` it answers;
- the trajectory does not name a sub-RLM's parent session nor which session made a
  `sub_call`, so both are placed by time: under the session one depth up whose iteration was
  running when the child (or the call) started; when two such sessions overlap, the earliest
  one is taken (`placed` says "time" for these inferences);
- a `sub_call` is written when the call ends, with its latency: its start is `t - latency_s`;
  an `rlm` sub-call is matched to the sub-RLM session whose events fall inside it, which
  gives that session its latency and its subtree's usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from host_poller.viewer import events as ev
from host_poller.viewer.reader import FileEvents

#: Sub-calls listed in one run's answer (the timeline and the tree); the rest are counted.
MAX_SUB_CALLS = 5000


@dataclass
class _Iteration:
    index: int
    started: float | None = None
    ended: float | None = None
    body: dict[str, Any] = field(default_factory=dict)

    def contains(self, t: float) -> bool:
        start = self.started if self.started is not None else self.ended
        end = self.ended if self.ended is not None else float("inf")
        return start is not None and start <= t <= end


@dataclass
class _Session:
    depth: int
    request_id: str | None
    tenant: str | None
    file: str
    first_t: float | None = None
    last_t: float | None = None
    iterations: dict[int, _Iteration] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    sub_calls: list[dict[str, Any]] = field(default_factory=list)
    children: list[_Session] = field(default_factory=list)
    usage: dict[str, float] = field(default_factory=lambda: ev.usage(None))
    answer: dict[str, Any] | None = None
    parent_iteration: int | None = None
    placed: str = "root"
    call: dict[str, Any] | None = None

    @property
    def node_id(self) -> str:
        return f"d{self.depth}:{self.request_id or 'root'}"

    def see(self, t: float | None) -> None:
        if t is not None:
            self.first_t = t if self.first_t is None else min(self.first_t, t)
            self.last_t = t if self.last_t is None else max(self.last_t, t)

    def iteration_at(self, t: float) -> _Iteration | None:
        for iteration in sorted(self.iterations.values(), key=lambda i: i.index):
            if iteration.contains(t):
                return iteration
        return None

    def spans(self, t: float) -> bool:
        return (
            self.first_t is not None
            and self.last_t is not None
            and (self.first_t <= t <= self.last_t)
        )


class RunTree:
    """Builds the tree of one run from its files' events; `to_json` is the API's answer."""

    def __init__(self, run_id: str, *, max_chars: int) -> None:
        self.run_id = run_id
        self.max_chars = max_chars
        self.sessions: dict[tuple[int, str | None], _Session] = {}
        self.calls: list[dict[str, Any]] = []
        self.calls_left_out = 0
        self.run_start: ev.Event | None = None
        self.run_end: ev.Event | None = None

    def add_file(self, part: FileEvents) -> None:
        for event in part.events:
            if event.get("run_id") == self.run_id:
                self._add(event, part)

    def _add(self, event: ev.Event, part: FileEvents) -> None:
        kind = event["event"]
        t = ev.number(event, "t")
        depth = ev.integer(event, "depth") or 0
        if kind == "sub_call":
            self._add_call(event, depth, t)
            return
        request_id = ev.text(event, "request_id")
        key = (depth, request_id)
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = _Session(
                depth, request_id, part.file.tenant, part.file.label
            )
        session.see(t)
        if kind == "run_start" and request_id is None:
            self.run_start = event
        elif kind == "run_end" and request_id is None:
            self.run_end = event
        elif kind in ("iteration_start", "iteration"):
            self._add_iteration(session, event, kind, t)
        elif kind == "last_call_reply":
            usage = ev.usage(event.get("usage"))
            session.usage = ev.add_usage(session.usage, usage)
            session.extra["last_call"] = {
                "response": ev.clip(ev.text(event, "response"), self.max_chars),
                "usage": usage,
            }
        elif kind == "error":
            session.errors.append(
                {
                    "where": ev.text(event, "where"),
                    "error": ev.clip(ev.text(event, "error"), self.max_chars),
                    "t": t,
                }
            )

    def _add_iteration(
        self, session: _Session, event: ev.Event, kind: str, t: float | None
    ) -> None:
        index = ev.integer(event, "index")
        if index is None or index < 0:
            return
        iteration = session.iterations.setdefault(index, _Iteration(index))
        if kind == "iteration_start":
            iteration.started = t
            return
        iteration.ended = t
        usage = ev.usage(event.get("usage"))
        session.usage = ev.add_usage(session.usage, usage)
        final = ev.mapping(event, "final")
        iteration.body = {
            "response": ev.clip(ev.text(event, "response"), self.max_chars),
            "code": [self._code(run) for run in _list(event.get("code"))],
            "usage": usage,
            "latency_s": ev.number(event, "latency_s"),
            "final": self._final(final),
        }
        if final is not None:
            session.answer = self._final(final)

    def _code(self, run: Any) -> dict[str, Any]:
        run = run if isinstance(run, dict) else {}
        error = ev.mapping(run, "error")
        return {
            "code": ev.clip(ev.text(run, "code"), self.max_chars),
            "stdout": ev.clip(ev.text(run, "stdout"), self.max_chars),
            "stderr": ev.clip(ev.text(run, "stderr"), self.max_chars),
            "error": None
            if error is None
            else {
                "type": ev.clip(ev.text(error, "type"), 200),
                "message": ev.clip(ev.text(error, "message"), self.max_chars),
                "traceback": ev.clip(ev.text(error, "traceback"), self.max_chars),
            },
            "final": self._final(ev.mapping(run, "final")),
            "duration_ms": ev.number(run, "duration_ms"),
        }

    def _final(self, final: dict[str, Any] | None) -> dict[str, Any] | None:
        if final is None:
            return None
        value = final.get("value")
        return {
            "value": ev.clip(value if isinstance(value, str) else repr(value), self.max_chars),
            "source": ev.clip(ev.text(final, "source"), 100),
        }

    def _add_call(self, event: ev.Event, depth: int, t: float | None) -> None:
        if len(self.calls) >= MAX_SUB_CALLS:
            self.calls_left_out += 1
            return
        latency = ev.number(event, "latency_s")
        start = t - latency if t is not None and latency is not None else t
        self.calls.append(
            {
                "id": f"c{len(self.calls)}",
                "depth": depth,
                "kind": ev.clip(ev.text(event, "kind"), 20) or "llm",
                "model": ev.clip(ev.text(event, "model"), 200),
                "usage": ev.usage(event.get("usage")),
                "latency_s": latency,
                "start": start,
                "end": t,
            }
        )

    # --- assembly ------------------------------------------------------------------------

    def _root(self) -> _Session:
        root = self.sessions.get((0, None))
        if root is None:
            # The root ran elsewhere (only sub-RLM files are here): a stand-in holds them.
            root = _Session(0, None, None, "")
            root.placed = "missing"
            self.sessions[(0, None)] = root
        return root

    def _parent_of(self, depth: int, t: float | None) -> tuple[_Session, _Iteration | None, str]:
        candidates = sorted(
            (s for (d, _), s in self.sessions.items() if d == depth - 1),
            key=lambda s: (s.first_t or 0.0, s.request_id or ""),
        )
        if t is not None:
            for session in candidates:
                iteration = session.iteration_at(t)
                if iteration is not None:
                    return session, iteration, "time"
            for session in candidates:
                if session.spans(t):
                    return session, None, "time"
        if len(candidates) == 1:
            return candidates[0], None, "depth"
        return self._root(), None, "unplaced"

    def _assemble(self) -> _Session:
        root = self._root()
        for call in sorted(self.calls, key=lambda c: c["start"] or 0.0):
            parent, iteration, placed = self._parent_of(call["depth"], call["start"])
            call["parent"] = parent.node_id
            call["iteration"] = iteration.index if iteration else None
            call["placed"] = placed
            parent.sub_calls.append(call)
        children = [s for s in self.sessions.values() if s.depth > 0]
        for child in sorted(children, key=lambda s: (s.depth, s.first_t or 0.0)):
            parent, iteration, child.placed = self._parent_of(child.depth, child.first_t)
            child.parent_iteration = iteration.index if iteration else None
            child.call = self._call_of(child)
            parent.children.append(child)
        return root

    def _call_of(self, child: _Session) -> dict[str, Any] | None:
        """The `rlm` sub-call that this sub-RLM answered: the one spanning its events."""
        for call in self.calls:
            if call["kind"] != "rlm" or call["depth"] != child.depth or call.get("node"):
                continue
            start, end = call["start"], call["end"]
            if None in (start, end, child.first_t, child.last_t):
                continue
            if start <= child.first_t and child.last_t <= end:
                call["node"] = child.node_id
                return dict(call)
        return None

    def to_json(self, files: list[FileEvents], summary: dict[str, Any] | None) -> dict[str, Any]:
        root = self._assemble()
        t0_candidates = [s.first_t for s in self.sessions.values() if s.first_t is not None]
        t0_candidates += [c["start"] for c in self.calls if c["start"] is not None]
        t0 = min(t0_candidates, default=None)
        notes = []
        if root.placed == "missing":
            notes.append("the root run's file is not in this directory: only sub-RLM parts")
        tenants = sorted({f.file.tenant or "" for f in files})
        if len(tenants) > 1:
            notes.append(f"parts from several tenant directories: {', '.join(tenants)}")
        if any(f.truncated for f in files):
            notes.append("some files were read only in part (RLM_VIEW_MAX_FILE_BYTES)")
        if self.calls_left_out:
            notes.append(f"{self.calls_left_out} more sub-calls not listed")
        return {
            "run": summary,
            "files": [f.describe() for f in files],
            "notes": notes,
            "start": self._start(),
            "end": self._end(),
            "root": self._node(root, t0),
            "timeline": {"t0": t0, "bars": _lanes(self.calls, t0)},
        }

    def _start(self) -> dict[str, Any] | None:
        event = self.run_start
        if event is None:
            return None
        return {
            "query": ev.clip(ev.text(event, "query"), self.max_chars),
            "model": ev.clip(ev.text(event, "model"), 200),
            "sub_model": ev.clip(ev.text(event, "sub_model"), 200),
            "environment": ev.clip(ev.text(event, "environment"), 100),
            "max_depth": ev.integer(event, "max_depth"),
            "max_iterations": ev.integer(event, "max_iterations"),
            "context_chars": ev.integer(event, "context_chars"),
            "t": ev.number(event, "t"),
        }

    def _end(self) -> dict[str, Any] | None:
        event = self.run_end
        if event is None:
            return None
        return {
            "answer": ev.clip(ev.text(event, "answer"), self.max_chars),
            "answer_source": ev.clip(ev.text(event, "answer_source"), 100),
            "stop_reason": ev.clip(ev.text(event, "stop_reason"), 100),
            "stop_detail": ev.clip(ev.text(event, "stop_detail"), 1000),
            "usage": ev.usage(event.get("usage")),
            "wall_s": ev.number(event, "wall_s"),
            "t": ev.number(event, "t"),
        }

    def _node(self, session: _Session, t0: float | None) -> dict[str, Any]:
        call = session.call
        latency = call["latency_s"] if call else None
        if latency is None and session.first_t is not None and session.last_t is not None:
            latency = session.last_t - session.first_t
        return {
            "id": session.node_id,
            "depth": session.depth,
            "request_id": session.request_id,
            "tenant": session.tenant,
            "file": session.file,
            "placed": session.placed,
            "parent_iteration": session.parent_iteration,
            "started": _rel(session.first_t, t0),
            "ended": _rel(session.last_t, t0),
            "latency_s": latency,
            "usage": session.usage,
            "subtree_usage": call["usage"] if call else None,
            "answer": session.answer,
            "errors": session.errors,
            "last_call": session.extra.get("last_call"),
            "iterations": [
                {
                    "index": it.index,
                    "started": _rel(it.started, t0),
                    "ended": _rel(it.ended, t0),
                    **it.body,
                }
                for it in sorted(session.iterations.values(), key=lambda i: i.index)
            ],
            "sub_calls": [_call_json(c, t0) for c in session.sub_calls],
            "children": [self._node(c, t0) for c in session.children],
        }


def _rel(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else round(t - t0, 6)


def _call_json(call: dict[str, Any], t0: float | None) -> dict[str, Any]:
    return {
        **{k: v for k, v in call.items() if k not in ("start", "end")},
        "start": _rel(call["start"], t0),
        "end": _rel(call["end"], t0),
    }


def _lanes(calls: list[dict[str, Any]], t0: float | None) -> list[dict[str, Any]]:
    """Timeline bars: each call on the first lane free at its start, so overlapping calls
    stack and the number of lanes is the most calls in flight at once."""
    lane_ends: list[float] = []
    bars = []
    timed = [c for c in calls if c["start"] is not None and c["end"] is not None]
    for call in sorted(timed, key=lambda c: (c["start"], c["end"])):
        lane = next((i for i, end in enumerate(lane_ends) if end <= call["start"]), None)
        if lane is None:
            lane = len(lane_ends)
            lane_ends.append(call["end"])
        else:
            lane_ends[lane] = call["end"]
        bars.append({**_call_json(call, t0), "lane": lane})
    return bars


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
