"""How much memory the runtime's sandboxes use (measured PSS) and may use (the live budget).

A sandbox is a process tree (bwrap and the Deno process under it); what it costs is the sum of
their PSS (`/proc/<pid>/smaps_rollup`), which adds up across processes without counting a
shared page twice. Reading `smaps_rollup` is not free: the kernel walks the page tables of
every mapping, and a Deno process reserves many GiB of address space (the WebAssembly memory
and V8's cage), so one read costs ~10-15 ms of kernel time. Readings therefore run in a worker
thread, at a bounded rate: a sandbox once when it starts, then only when it ran something
since its last reading (`changed`), when another sandbox ended since (the pages they shared
now fall on the rest; at most once per `interval_s`), or when that reading is older than
`_REFRESH_S`. A start-up is decided on fresh readings (`WarmPool` measures before admitting
one).

The budget (`RLM_SANDBOX_LIVE_MEMORY_BYTES`; 0: `AUTO_FRACTION` of the memory this process may
use: its cgroup's limit, else MemTotal) is what the pool and the sessions are kept under.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from sandbox_runtime.worker.snapshot_memory import MAPPED_NAME_PREFIX

logger = logging.getLogger(__name__)

_KiB = 1024
_MiB = 2**20

#: The share of the runtime's memory limit the sandboxes may hold when the budget is "auto";
#: the rest is for the runtime's own process (~100 MiB), the hibernation blobs it holds in
#: memory (RLM_SANDBOX_HIBERNATION_MEMORY_BYTES), the page cache, and a sandbox growing
#: between two readings.
AUTO_FRACTION = 0.6
#: What one sandbox is taken to cost before any was measured: alone on the machine (its
#: Deno binary's pages all its own) a warm sandbox measured ~89 MiB PSS, a session after
#: `bench/sandbox_worker.py`'s LOAD_SESSION ~100 MiB.
INITIAL_ESTIMATE_BYTES = 100 * _MiB
#: A reading older than this is taken again even if the sandbox ran nothing (the share of
#: pages it shares with others moves as sandboxes come and go).
_REFRESH_S = 60.0
#: Readings the per-sandbox estimate is the median of.
_SAMPLES = 64
#: How deep a sandbox's process tree is followed (bwrap, its pid-namespace init, Deno).
_MAX_DEPTH = 4
#: A cgroup v1 limit this large means "no limit" (the kernel's page-rounded LONG_MAX).
_V1_UNLIMITED = 2**62


class Measurable(Protocol):
    """A sandbox as this module sees it (`SandboxProcess`)."""

    @property
    def launcher_pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...


# --- reading PSS -------------------------------------------------------------------------------


def rollup_kib(pid: int, proc: Path = Path("/proc")) -> dict[str, int] | None:
    """The fields of one process's `smaps_rollup` (`Pss`, `Pss_Anon`, `Private_Dirty`, ...),
    in KiB; None if it is gone (also when it exits while it is read) or not ours to read.
    A zombie's rollup has no fields."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:  # ENOENT / ESRCH: it exited; EACCES: not ours to read
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines()[1:]:  # the first line names the (rolled up) mapping
        name, _, rest = line.partition(":")
        if value := rest.split():
            fields[name] = int(value[0])
    return fields


def process_pss(pid: int, proc: Path = Path("/proc")) -> int | None:
    """PSS of one process in bytes; None if it is gone, not ours to read, or a zombie."""
    fields = rollup_kib(pid, proc)
    if not fields or "Pss" not in fields:
        return None
    return fields["Pss"] * _KiB


def _children(pid: int, proc: Path) -> list[int]:
    """Children of every thread of `pid` (a child belongs to the thread that forked it)."""
    found: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:  # the thread (or the process) ended meanwhile
            continue
    return found


def descendants(pid: int, proc: Path = Path("/proc"), max_depth: int = _MAX_DEPTH) -> list[int]:
    """`pid`'s children, theirs, ... down `max_depth` generations (those that exit meanwhile
    are simply not found)."""
    found: list[int] = []
    seen = {pid}
    level = _children(pid, proc)
    for _ in range(max_depth):
        following: list[int] = []
        for current in level:
            if current not in seen:
                seen.add(current)
                found.append(current)
                following.extend(_children(current, proc))
        if not following:
            break
        level = following
    return found


def tree_pss(pid: int, proc: Path = Path("/proc")) -> int | None:
    """PSS of `pid` and its descendants, in bytes; a descendant that exits meanwhile counts 0,
    and None says `pid` itself could not be read (gone)."""
    if (total := process_pss(pid, proc)) is None:
        return None
    return total + sum(process_pss(child, proc) or 0 for child in descendants(pid, proc))


class Region(NamedTuple):
    """One mapping of a process, from /proc/<pid>/smaps (sizes in KiB)."""

    start: int
    end: int
    perms: str
    path: str
    pss: int
    #: Pages of it the process copied at a write (of a file's private mapping: its own).
    anonymous: int


def smaps_regions(pid: int, proc: Path = Path("/proc")) -> list[Region]:
    """The mappings of live process `pid`, in address order."""
    regions: list[Region] = []
    for line in (proc / str(pid) / "smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # a mapping: span, perms, offset, device, inode, path
        if not fields[0].endswith(":"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            regions.append(
                Region(start, end, fields[1], fields[5] if len(fields) > 5 else "", 0, 0)
            )
        elif fields[0] == "Pss:":
            regions[-1] = regions[-1]._replace(pss=int(fields[1]))
        elif fields[0] == "Anonymous:":
            regions[-1] = regions[-1]._replace(anonymous=int(fields[1]))
    return regions


def snapshot_file_kib(pids: Iterable[int], proc: Path = Path("/proc")) -> tuple[int, int]:
    """(held, mapped) in KiB: the snapshot memory files `pids` hold open (their pages written,
    each file once), and the part of them these processes' mappings count in their PSS (the
    file's pages, not those a write copied). What is held and not mapped is in no process's
    PSS (for the benches' accounting)."""
    held: dict[tuple[int, int], int] = {}
    mapped = 0
    for pid in pids:
        try:
            for fd in (proc / str(pid) / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(MAPPED_NAME_PREFIX):
                        info = fd.stat()
                        held[(info.st_dev, info.st_ino)] = info.st_blocks // 2
            mapped += sum(
                region.pss - region.anonymous
                for region in smaps_regions(pid, proc)
                if region.path.startswith(MAPPED_NAME_PREFIX)
            )
        except (OSError, ProcessLookupError):  # gone meanwhile
            continue
    return sum(held.values()), mapped


# --- the budget --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Bytes the sandboxes may hold, and where that figure came from."""

    bytes: int
    #: `RLM_SANDBOX_LIVE_MEMORY_BYTES`, or for auto the limit it is a fraction of:
    #: `cgroup memory.max`, `cgroup memory.limit_in_bytes` (v1), `MemTotal`, or `unlimited`.
    source: str
    #: The memory the runtime may use (auto), None when the budget was configured.
    limit_bytes: int | None = None

    @classmethod
    def unlimited(cls) -> MemoryBudget:
        return cls(bytes=2**63 - 1, source="unlimited")

    def as_dict(self) -> dict[str, int | str | None]:
        return {"bytes": self.bytes, "source": self.source, "limit_bytes": self.limit_bytes}


def memory_limit(
    proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> tuple[int, str]:
    """The memory this process may use and what says so: the lowest limit of its cgroup and
    the cgroup's ancestors (v2 `memory.max`, else v1 `memory.limit_in_bytes`), never more
    than MemTotal."""
    total = _mem_total(proc)
    limit, source = total, "MemTotal"
    for found, name in _cgroup_limits(proc, cgroup_root):
        if found < limit:
            limit, source = found, name
    return limit, source


def resolve_budget(
    configured: int,
    *,
    proc: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> MemoryBudget:
    """`configured` bytes, or (0) `AUTO_FRACTION` of `memory_limit()`."""
    if configured > 0:
        return MemoryBudget(bytes=configured, source="RLM_SANDBOX_LIVE_MEMORY_BYTES")
    limit, source = memory_limit(proc, cgroup_root)
    return MemoryBudget(bytes=int(limit * AUTO_FRACTION), source=source, limit_bytes=limit)


def _mem_total(proc: Path) -> int:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * _KiB
    except (OSError, ValueError, IndexError):
        pass
    raise ValueError(f"cannot read MemTotal from {proc / 'meminfo'}")


def _cgroup_limits(proc: Path, root: Path) -> Iterable[tuple[int, str]]:
    """Every memory limit set on this process's cgroup or an ancestor, v2 and v1."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            yield from _limits_up(root, path, "memory.max", "cgroup memory.max")
        elif "memory" in controllers.split(","):
            yield from _limits_up(
                root / "memory", path, "memory.limit_in_bytes", "cgroup memory.limit_in_bytes"
            )


def _limits_up(base: Path, path: str, name: str, source: str) -> Iterable[tuple[int, str]]:
    """The limit file `name` in the cgroup at `path` under `base` and in each ancestor (a
    cgroup namespace shows its root as `/`; a missing directory is skipped)."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        try:
            raw = (base.joinpath(*parts[:depth]) / name).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _V1_UNLIMITED:  # v2 says "max" when there is none
            yield int(raw), source


# --- what the sandboxes hold -------------------------------------------------------------------


@dataclass(slots=True)
class _Reading:
    pss: int | None = None  # None: not read yet (counted at the estimate)
    at: float = 0.0
    changed: bool = True
    #: another sandbox ended since: the pages they shared now fall on fewer
    neighbour_gone: bool = False


class SandboxMemory:
    """The latest PSS of every live sandbox of this replica, and the budget they are kept in.

    The pool `track`s each sandbox it starts; a sandbox that died (`alive` false) drops out
    of `total` at once, without a reading. `interval_s` is how often `measure` runs (the
    reaper's interval); a caller refused for memory is told to retry after it.
    """

    def __init__(
        self, budget: MemoryBudget, *, interval_s: float = 5.0, proc: Path = Path("/proc")
    ) -> None:
        self.budget = budget
        self.interval_s = interval_s
        self._proc = proc
        self._readings: dict[Measurable, _Reading] = {}
        self._samples: deque[int] = deque(maxlen=_SAMPLES)
        #: The last reading: how long it took, of how many sandboxes.
        self.last_measure_s = 0.0
        self.last_measured_count = 0

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.interval_s))

    def track(self, sandbox: Measurable, pss: int | None = None) -> None:
        """Count `sandbox` from now on (at `pss`, else at the estimate until it is read)."""
        self._readings[sandbox] = _Reading(pss, time.monotonic(), changed=pss is None)
        if pss is not None:
            self._samples.append(pss)

    def changed(self, sandbox: Measurable) -> None:
        """`sandbox` ran something: read it again at the next `measure` (no reading now)."""
        reading = self._readings.get(sandbox)
        if reading is not None:
            reading.changed = True

    async def read(self, sandbox: Measurable) -> None:
        """Count `sandbox`, read now (in a thread): e.g. right after it started."""
        self.track(sandbox, await asyncio.to_thread(tree_pss, sandbox.launcher_pid, self._proc))

    async def measure(self) -> None:
        """Read every sandbox that is unread, ran something, or was read `_REFRESH_S` ago."""
        self._prune()
        now = time.monotonic()
        due = [
            (sandbox, sandbox.launcher_pid)
            for sandbox, r in self._readings.items()
            if r.changed
            or r.pss is None
            or now - r.at >= _REFRESH_S
            # At most once per `interval_s`: a churn of ending sessions must not have every
            # live one read at each measure.
            or (r.neighbour_gone and now - r.at >= self.interval_s)
        ]
        if not due:
            return
        for sandbox, _ in due:  # a change while the thread reads marks it again
            marks = self._readings[sandbox]
            marks.changed = marks.neighbour_gone = False
        started = time.perf_counter()
        values = await asyncio.to_thread(lambda: [tree_pss(pid, self._proc) for _, pid in due])
        self.last_measure_s = time.perf_counter() - started
        self.last_measured_count = len(due)
        for (sandbox, _), pss in zip(due, values, strict=True):
            reading = self._readings.get(sandbox)
            if reading is not None and pss is not None and sandbox.alive:
                reading.pss, reading.at = pss, now
                self._samples.append(pss)

    @property
    def estimate(self) -> int:
        """What one more sandbox is taken to cost: the median of recent readings."""
        if not self._samples:
            return INITIAL_ESTIMATE_BYTES
        return int(statistics.median(self._samples))

    @property
    def total(self) -> int:
        """Bytes the live sandboxes hold: read figures, the estimate for unread ones."""
        self._prune()
        estimate = self.estimate
        return sum(estimate if r.pss is None else r.pss for r in self._readings.values())

    @property
    def count(self) -> int:
        self._prune()
        return len(self._readings)

    def fits(self, more: int = 1) -> bool:
        """Whether `more` sandboxes of the estimated size fit in the budget besides the live."""
        return self.total + more * self.estimate <= self.budget.bytes

    def room(self) -> int:
        """How many more sandboxes of the estimated size fit in the budget (0 or more)."""
        return max(0, (self.budget.bytes - self.total) // max(1, self.estimate))

    def _prune(self) -> None:
        gone = [s for s in self._readings if not s.alive]
        for sandbox in gone:
            del self._readings[sandbox]
        if gone:
            # The pages a gone sandbox shared (Deno's binary, Pyodide's files) are now split
            # among fewer: every other reading is low until it is taken again.
            for reading in self._readings.values():
                reading.neighbour_gone = True

    def as_dict(self) -> dict[str, object]:
        """The figures /health reports."""
        return {
            "budget_bytes": self.budget.bytes,
            "budget_source": self.budget.source,
            "limit_bytes": self.budget.limit_bytes,
            "used_bytes": self.total,
            "sandboxes": self.count,
            "sandbox_estimate_bytes": self.estimate,
            "last_measure_ms": round(self.last_measure_s * 1000, 1),
            "last_measured_sandboxes": self.last_measured_count,
        }
