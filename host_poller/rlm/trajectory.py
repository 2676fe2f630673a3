"""The JSONL trajectory of a run: one JSON object per line, one event each.

Events: `run_start`, `iteration` (reply, code, outputs, usage, latency), `sub_call`
(depth, kind, model, usage, latency), `run_end` (answer, stop reason, usage). Every event
carries `run_id`, `depth` and `t` (Unix time); sub-RLMs running in the same process write
into their run's file, so one file replays the whole tree. No secret is ever written, but
tenants' prompts and outputs are: files are created private to this user (0600, directories
0700), never through a symbolic link.

The directory is bounded: each writer opened for a run (`TrajectoryWriter.for_run`) has the
directory pruned, in a background thread and at most once a minute, to
`RLM_TRAJECTORY_MAX_BYTES`, the least recently written files first (`prune_trajectories`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from host_poller.private_files import open_private, private_dirs
from host_poller.settings import HostSettings

logger = logging.getLogger(__name__)

#: How often one directory is pruned at the most: a pass stats every file in it.
PRUNE_EVERY_S = 60.0
_last_pruned: dict[Path, float] = {}
#: Files writers of this process have open, and how many writers each: never pruned (a run
#: writing slowly among many quick ones could otherwise be the least recently written).
_open_paths: Counter[Path] = Counter()
_state_lock = threading.Lock()  # of the two above: writers and prunes run on many threads


class TrajectoryWriter:
    """Appends events to one JSONL file; thread-safe; each line is flushed as written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dirs(path.parent)
        self._lock = threading.Lock()
        self._file: TextIO | None = open_private(path, "a")
        with _state_lock:
            _open_paths[path] += 1

    @classmethod
    def for_run(cls, settings: HostSettings, path: Path) -> TrajectoryWriter:
        """A writer of `path`, a run's file under `settings.trajectory_dir`, that directory
        pruned to `settings.trajectory_max_bytes` soon (see `prune_soon`)."""
        writer = cls(path)
        prune_soon(settings.trajectory_dir, settings.trajectory_max_bytes)
        return writer

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
                with _state_lock:
                    _open_paths[self.path] -= 1
                    if _open_paths[self.path] <= 0:
                        del _open_paths[self.path]


def _trajectory_files(root: Path) -> Iterator[tuple[float, int, Path]]:
    """(last write, size, path) of each trajectory file in `root` and its tenant
    subdirectories: regular files named *.jsonl, no symbolic link followed."""
    directories = [root]
    try:
        with os.scandir(root) as entries:
            directories += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                found = [e for e in entries if e.name.endswith(".jsonl")]
        except FileNotFoundError:  # removed meanwhile
            continue
        for entry in found:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    yield info.st_mtime, info.st_size, Path(entry.path)


def prune_trajectories(root: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently written trajectory files under `root` (and its tenant
    subdirectories) until the rest fit in `max_bytes`, except those a writer of this process
    has open; the files removed."""
    files = sorted(_trajectory_files(root))
    total = sum(size for _, size, _ in files)
    with _state_lock:
        in_use = set(_open_paths)
    removed = []
    for _, size, path in files:
        if total <= max_bytes:
            break
        if path in in_use:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "cannot remove a trajectory file", extra={"path": str(path), "error": str(exc)}
            )
            continue
        else:
            removed.append(path)
        total -= size
    return removed


def prune_soon(root: Path, max_bytes: int) -> None:
    """`prune_trajectories` in a background thread, unless `root` was pruned less than
    PRUNE_EVERY_S ago by this process."""
    now = time.monotonic()
    with _state_lock:
        if now - _last_pruned.get(root, -PRUNE_EVERY_S) < PRUNE_EVERY_S:
            return
        _last_pruned[root] = now
    threading.Thread(
        target=_prune_logged, args=(root, max_bytes), name="trajectory-prune", daemon=True
    ).start()


def _prune_logged(root: Path, max_bytes: int) -> None:
    try:
        removed = prune_trajectories(root, max_bytes)
    except OSError as exc:
        logger.warning("trajectory pruning failed", extra={"path": str(root), "error": str(exc)})
        return
    if removed:
        logger.info(
            "old trajectories removed",
            extra={"path": str(root), "files": len(removed), "max_bytes": max_bytes},
        )


def read_trajectory(path: Path) -> list[dict[str, Any]]:
    """All events of a trajectory file, in order."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
