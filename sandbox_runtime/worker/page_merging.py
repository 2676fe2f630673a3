"""Kernel same-page merging (KSM) of sandbox processes, when RLM_SANDBOX_MERGE_PAGES asks for it.

Every sandbox starts from the same Pyodide snapshot and runs the same Deno, so much of a live
session's private memory is byte for byte its neighbours': the WebAssembly heap restored from
the snapshot, V8's compiled code and heap, the allocator's arenas. With the setting, each
sandbox process is started with `prctl(PR_SET_MEMORY_MERGE, 1)` (Linux 6.4 and later), which
the kernel keeps across fork and exec, so it reaches Deno through the confinement wrappers.
The kernel's merging thread (ksmd) then keeps one copy of each identical anonymous page for
all of them, copied again on the first write. PSS counts a merged page once among its holders,
so the runtime's memory budget sees the saving without more code.

ksmd runs only where the machine's administrator started it (`/sys/kernel/mm/ksm/run` = 1): a
setting for the whole machine, which the runtime reads and never changes. /health says
whether merging is asked for, possible and running.

Why it is off by default: merging lets no sandbox read or write another's memory, but it is a
timing side channel between all processes that opted in. A write to a merged page takes a
copy-on-write fault, so guest code can tell whether some other sandbox holds a page identical
to one it built (4 KiB it must already know, up to a few guessed bytes), and on memory prone to
Rowhammer a merged page is shared physical memory an attacker can target. So it suits a
runtime whose sessions belong to one tenant, or to tenants that trust each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: From <linux/prctl.h> (Linux 6.4): make every anonymous mapping of the process mergeable.
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
KSM_DIR = Path("/sys/kernel/mm/ksm")


@dataclass(frozen=True, slots=True)
class PageMerging:
    """Whether sandboxes' identical pages are merged here, and why not if they are not."""

    requested: bool
    #: The kernel knows PR_SET_MEMORY_MERGE (6.4+, built with CONFIG_KSM); None: not looked
    #: at, merging was not asked for.
    supported: bool | None
    #: ksmd's state: "running", "stopped", or "absent" (no KSM in this kernel).
    ksmd: str

    @property
    def active(self) -> bool:
        """Pages are being merged: opted in, and the machine's ksmd runs."""
        return self.opted_in and self.ksmd == "running"

    @property
    def opted_in(self) -> bool:
        """Sandboxes started now opt in (ksmd may merge their pages whenever it runs)."""
        return self.requested and bool(self.supported)

    @property
    def detail(self) -> str:
        if not self.requested:
            return "no page of a sandbox is merged with another's"
        if not self.supported:
            return (
                "RLM_SANDBOX_MERGE_PAGES asked for, but this kernel has no PR_SET_MEMORY_MERGE "
                "(Linux 6.4+, KSM): no page is merged"
            )
        return (
            "sandboxes opt in to kernel same-page merging (KSM), a timing side channel between "
            f"sessions; ksmd is {self.ksmd}"
            + ("" if self.ksmd == "running" else f" ({KSM_DIR}/run is not 1): nothing merged yet")
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "supported": self.supported,
            "ksmd": self.ksmd,
            "active": self.active,
        }


def status(requested: bool, ksm_dir: Path = KSM_DIR) -> PageMerging:
    """The state of page merging for sandboxes started now (ksmd's state read each time; the
    kernel asked about the prctl only when merging is asked for)."""
    return PageMerging(requested, _prctl_supported() if requested else None, _ksmd_state(ksm_dir))


def _ksmd_state(ksm_dir: Path) -> str:
    try:
        run = (ksm_dir / "run").read_text().strip()
    except OSError:
        return "absent"
    return "running" if run == "1" else "stopped"


@functools.cache
def _libc_prctl() -> Callable[..., int] | None:
    import ctypes  # only when merging is asked for

    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


@functools.cache
def _prctl_supported() -> bool:
    """PR_GET_MEMORY_MERGE answers 0 or 1 where the kernel has it, -1 (EINVAL) where not."""
    prctl = _libc_prctl()
    return prctl is not None and prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) >= 0


def opt_in_before_exec() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child's memory mergeable before it execs; None where the
    kernel cannot (then the child starts as it would without the setting).

    It runs in the forked child, so it only calls the function resolved here, in the parent,
    and never raises: a refusal costs the saving, not the sandbox.
    """
    prctl = _libc_prctl() if _prctl_supported() else None
    if prctl is None:
        return None

    def opt_in() -> None:
        prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)

    return opt_in
