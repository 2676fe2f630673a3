"""Reading the trajectory directory: the reader beside `host_poller.rlm.trajectory`'s writer.

The writer appends one JSON object a line to `<dir>/<run_id>.jsonl` (a root run, and the
sub-RLMs of its process) and to `<dir>/<tenant>/<run_id>.d<depth>.<request_id>.jsonl` (a
sub-RLM run by a poller that does not hold the run). This module finds those files and reads
their events, and nothing else:

- only regular files directly in the directory or in one level of tenant subdirectories,
  opened relative to the directory's descriptor with `O_NOFOLLOW`: a symbolic link (file or
  subdirectory) is never followed, so nothing outside the directory is read;
- names are matched against a strict pattern; no request string ever becomes a path;
- every read is bounded (bytes per file), and a torn or truncated last line (a writer still
  appending, a crash) is counted and skipped, never an error.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: A tenant subdirectory: an identifier (`rlm_wire.run_info.ID_PATTERN`, what the writer uses).
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A trajectory file: identifiers joined by dots, ending in `.jsonl`.
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,250}\.jsonl")

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in the directory must not block the open; it is then refused as
# not a regular file.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Event = dict[str, Any]


@dataclass(frozen=True, order=True)
class TrajectoryFile:
    """One file of the directory, as found by a scan."""

    mtime_ns: int
    size: int
    tenant: str | None
    """The tenant subdirectory it is in; None for the top level."""
    name: str

    @property
    def label(self) -> str:
        return self.name if self.tenant is None else f"{self.tenant}/{self.name}"


@dataclass
class FileEvents:
    """The events read from one file."""

    file: TrajectoryFile
    events: list[Event] = field(default_factory=list)
    truncated: bool = False
    """Only the first `max_bytes` bytes were read."""
    bad_lines: int = 0
    """Lines that were not a JSON object with an `event` (a torn last line, damage)."""

    def describe(self) -> dict[str, Any]:
        return {
            "tenant": self.file.tenant,
            "name": self.file.name,
            "bytes": self.file.size,
            "events": len(self.events),
            "truncated": self.truncated,
            "bad_lines": self.bad_lines,
        }


@dataclass(frozen=True)
class Scan:
    """The files of a scan, newest first, and how many were left out past the cap."""

    files: list[TrajectoryFile]
    left_out: int


class TrajectoryDir:
    """The trajectory directory, read-only. A missing directory reads as empty."""

    def __init__(self, root: Path, *, max_files: int, max_file_bytes: int) -> None:
        self.root = root
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes

    def scan(self) -> Scan:
        """The newest `max_files` trajectory files (top level and tenant subdirectories)."""
        found: list[TrajectoryFile] = []
        with self._root_fd() as root_fd:
            if root_fd is None:
                return Scan([], 0)
            found.extend(_files_in(root_fd, None))
            for tenant in _tenant_dirs(root_fd):
                with _open_dir(tenant, root_fd) as tenant_fd:
                    if tenant_fd is not None:
                        found.extend(_files_in(tenant_fd, tenant))
        newest = heapq.nlargest(self.max_files, found)
        return Scan(newest, len(found) - len(newest))

    def read(self, file: TrajectoryFile, max_bytes: int | None = None) -> FileEvents | None:
        """The events of `file` (as scanned), or None if it is gone or no longer a regular
        file. At most `max_bytes` (default: the per-file cap) bytes are read."""
        limit = min(
            self.max_file_bytes, max_bytes if max_bytes is not None else self.max_file_bytes
        )
        with self._root_fd() as root_fd:
            if root_fd is None:
                return None
            if file.tenant is None:
                return _read_file(root_fd, file, limit)
            with _open_dir(file.tenant, root_fd) as tenant_fd:
                if tenant_fd is None:
                    return None
                return _read_file(tenant_fd, file, limit)

    @contextlib.contextmanager
    def _root_fd(self) -> Iterator[int | None]:
        # The directory itself is the operator's choice (it may be a link); what is in it is not.
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)


@contextlib.contextmanager
def _open_dir(name: str, parent_fd: int) -> Iterator[int | None]:
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except OSError:  # gone, a symbolic link (ELOOP), not a directory, not readable
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _tenant_dirs(root_fd: int) -> list[str]:
    with os.scandir(root_fd) as entries:
        return [
            e.name for e in entries if _TENANT.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]


def _files_in(dir_fd: int, tenant: str | None) -> list[TrajectoryFile]:
    files = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if not _FILE.fullmatch(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                files.append(TrajectoryFile(info.st_mtime_ns, info.st_size, tenant, entry.name))
    return files


def _read_file(dir_fd: int, file: TrajectoryFile, limit: int) -> FileEvents | None:
    try:
        fd = os.open(file.name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError:  # gone since the scan, or replaced by a symbolic link (ELOOP)
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        data = handle.read(limit + 1)
    return parse_lines(data, file, limit)


def parse_lines(data: bytes, file: TrajectoryFile, limit: int) -> FileEvents:
    """The events of `data` (at most `limit` bytes are used); tolerant of a torn last line."""
    out = FileEvents(file)
    if len(data) > limit:
        out.truncated = True
        # Keep whole lines only: the cut may fall inside one.
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        event = _event(line)
        if event is None:
            out.bad_lines += 1
        else:
            out.events.append(event)
    return out


def _event(line: bytes) -> Event | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # torn, not UTF-8, or nested past the parser's stack
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value
