"""Confinement of a sandbox process by the kernel, below Deno's permissions.

Deno's permission model is a useful layer, not a boundary: JavaScript reachable from Pyodide
can call Deno's internal ops, and some of them skip the permission checks (a node-compat
fchmod/fchown through a descriptor opened read-only changed host files' modes). So each
sandbox process also runs under bubblewrap:

- its own identity: as root, `setpriv` drops to a uid (and gid) of its own, from
  `uid_base`, owning no file; otherwise the runtime's uid, inside a user namespace;
- a mount namespace whose root is an empty tmpfs holding only the Deno binary and the
  libraries it links, the Pyodide directory, our JS and guest sources and the REPL file,
  each bound read-only, /proc of its own pid namespace, a minimal /dev and a small tmpfs
  /tmp; the root is remounted read-only: no writable host path at all (the memory
  snapshot's bytes come over the request pipe);
- empty network, pid, ipc, uts and cgroup namespaces; no further user namespaces;
- no capabilities, no new privileges (bwrap sets PR_SET_NO_NEW_PRIVS), its own session;
- a seccomp deny-list (`seccomp`), where the architecture has a table;
- kernel resource limits set by `prlimit` before anything runs: RLIMIT_DATA (the memory
  the process may commit: WebAssembly bound plus headroom), RLIMIT_CPU, RLIMIT_NOFILE,
  RLIMIT_CORE=0, and RLIMIT_NPROC for a sandbox with its own uid.

Where bwrap cannot run (not installed, or user namespaces refused, as in many unprivileged
containers), `auto` falls back to `unshare -n`, and `check_allowed` refuses to start
sandboxes unless RLM_SANDBOX_ALLOW_WEAKER says to run with less.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import SandboxStartError
from . import seccomp
from .settings import WorkerSettings

logger = logging.getLogger(__name__)

Mode = Literal["bwrap", "unshare", "none"]

#: Size of the sandbox's private /tmp (Deno's own cache dir lives there).
TMP_BYTES = 16 * 2**20
#: Where Deno keeps its cache inside the sandbox (nothing of the host's is visible).
SANDBOX_DENO_DIR = "/tmp/deno"  # noqa: S108 (the sandbox's own tmpfs)
#: Where a confined sandbox reads its interrupt file (`launcher.InterruptFile`): bound
#: read-only into its own /tmp.
SANDBOX_INTERRUPT_FILE = "/tmp/rlm-interrupts"  # noqa: S108 (the sandbox's own tmpfs)
_PROBE_TIMEOUT_S = 20.0
_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


@dataclass(frozen=True, slots=True)
class Support:
    """What this machine gives sandbox processes under some settings, probed once."""

    mode: Mode
    bwrap: str | None
    #: The runtime is root: each sandbox gets a uid of its own (and RLIMIT_NPROC on it).
    own_uid: bool
    seccomp: bool
    unshare: str | None
    #: Why a required layer is missing (empty: every layer in force).
    problems: tuple[str, ...] = field(default=())

    @property
    def weaker(self) -> bool:
        return bool(self.problems)


@dataclass(slots=True)
class Wrapped:
    """What one launch adds around `deno run`: the command prefix, the descriptors it passes
    (the seccomp program), the environment, and the sandbox uid leased until `release()`."""

    prefix: list[str]
    #: Descriptors the child inherits besides its pipes; the parent closes its copies once
    #: the child started.
    pass_fds: list[int]
    uid: int | None
    env: dict[str, str]
    #: Runs under bwrap (else Deno sees the host's file system, behind its permissions).
    confined: bool = False
    #: The rlimits are set by the `prlimit` wrapper (else the caller sets them afterwards).
    limits_set: bool = False

    def close_fds(self) -> None:
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []

    def release(self) -> None:
        if self.uid is not None:
            _uids_in_use.discard(self.uid)
            self.uid = None


_uids_in_use: set[int] = set()
_next_uid_slot = 0


def _lease_uid(settings: WorkerSettings) -> int:
    global _next_uid_slot
    for _ in range(settings.uid_count):
        uid = settings.uid_base + _next_uid_slot
        _next_uid_slot = (_next_uid_slot + 1) % settings.uid_count
        if uid not in _uids_in_use:
            _uids_in_use.add(uid)
            return uid
    raise SandboxStartError(
        f"all {settings.uid_count} sandbox uids are in use (RLM_SANDBOX_UID_COUNT)"
    )


def bwrap_binary(settings: WorkerSettings) -> str | None:
    if settings.bwrap_path is not None:
        return str(settings.bwrap_path) if settings.bwrap_path.is_file() else None
    return shutil.which("bwrap")


@functools.cache
def libraries(deno_path: str) -> tuple[str, ...]:
    """The shared libraries (and loader) the Deno binary links, as `ldd` names them."""
    try:
        done = subprocess.run(
            ["ldd", deno_path], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = []
    for line in done.stdout.splitlines():
        match = _LDD_LINE.match(line)
        if match:
            found.append(match.group(1))
    return tuple(found)


def wrap(
    settings: WorkerSettings,
    support: Support,
    visible: list[Path],
    *,
    memory_bytes: int,
    interrupt_fd: int | None = None,
) -> Wrapped:
    """The prefix that confines `deno run` as `support` allows, `visible` bound read-only.

    `interrupt_fd`: the sandbox's interrupt file (`launcher.InterruptFile`), bound read-only
    at `SANDBOX_INTERRUPT_FILE` through a descriptor of it (none of its directories open).
    The memory snapshot is not bound: its directory may be closed to the sandbox's uid (e.g.
    under /root), which bwrap cannot bind from; the launcher passes a descriptor of it."""
    env = {"DENO_DIR": str(settings.cache_dir / "deno")}
    own_uid = support.mode == "bwrap" and support.own_uid
    prefix = _limits_prefix(settings, memory_bytes, own_uid=own_uid)
    limits = bool(prefix)
    if support.mode != "bwrap" or support.bwrap is None:
        if support.mode == "unshare" and support.unshare is not None:
            prefix += [support.unshare, "-n", "--"]
        return Wrapped(prefix, [], None, env, limits_set=limits)
    uid = _lease_uid(settings) if support.own_uid else None
    owned: list[int] = []
    try:
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        prefix += [support.bwrap, *_namespace_args()]
        deno = settings.deno_path
        for path in (deno, *map(Path, libraries(str(deno))), *visible):
            prefix += ["--ro-bind", str(path.resolve()), str(path)]
        prefix += ["--remount-ro", "/"]
        if interrupt_fd is not None:
            owned.append(os.dup(interrupt_fd))
            prefix += ["--ro-bind-fd", str(owned[-1]), SANDBOX_INTERRUPT_FILE]
        if support.seccomp:
            owned.append(_seccomp_fd())
            prefix += ["--seccomp", str(owned[-1])]
        prefix.append("--")
    except BaseException:
        for fd in owned:
            os.close(fd)
        if uid is not None:
            _uids_in_use.discard(uid)
        raise
    env = {"DENO_DIR": SANDBOX_DENO_DIR}
    return Wrapped(prefix, owned, uid, env, confined=True, limits_set=limits)


def _namespace_args() -> list[str]:
    return [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--as-pid-1",
        "--hostname",
        "sandbox",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(TMP_BYTES),
        "--tmpfs",
        "/tmp",  # noqa: S108 (a tmpfs of its own, not the host's /tmp)
        "--chdir",
        "/",
    ]


def _limits_prefix(settings: WorkerSettings, memory_bytes: int, *, own_uid: bool) -> list[str]:
    """`prlimit` setting the limits on itself before the rest runs (and is inherited)."""
    binary = shutil.which("prlimit")
    if binary is None:
        return []
    data = data_limit(settings, memory_bytes)
    argv = [
        binary,
        f"--data={data}:{data}",
        f"--cpu={settings.cpu_seconds}:{settings.cpu_seconds + 5}",
        f"--nofile={settings.max_open_files}:{settings.max_open_files}",
        "--core=0:0",
    ]
    if own_uid:
        argv.append(f"--nproc={settings.max_threads}:{settings.max_threads}")
    return [*argv, "--"]


def data_limit(settings: WorkerSettings, memory_bytes: int) -> int:
    """RLIMIT_DATA of a sandbox whose WebAssembly bound is `memory_bytes`."""
    return memory_bytes + settings.memory_headroom_bytes


def _seccomp_fd() -> int:
    """A pipe holding the compiled filter; bwrap reads it to the end."""
    program = seccomp.deny_list_program()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, program)
    finally:
        os.close(write_end)
    return read_end


def _probe_bwrap(
    settings: WorkerSettings, bwrap: str, own_uid: bool, visible: tuple[Path, ...]
) -> str | None:
    """Run `deno --version` confined exactly as sandboxes are; None if it works, else why."""
    support = Support("bwrap", bwrap, own_uid, seccomp.supported(), None)
    wrapped = wrap(settings, support, list(visible), memory_bytes=settings.memory_bytes)
    try:
        done = subprocess.run(
            [*wrapped.prefix, str(settings.deno_path), "--version"],
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
            pass_fds=wrapped.pass_fds,
            env={"PATH": "/usr/bin:/bin", **wrapped.env},
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not run: {exc}"
    finally:
        wrapped.close_fds()
        wrapped.release()
    if done.returncode != 0 or not done.stdout.startswith(b"deno "):
        detail = done.stderr.decode("utf-8", "replace").strip()[-300:]
        return f"bwrap refused to start a sandbox (exit {done.returncode}): {detail}"
    return None


def network_namespace_works(unshare: str) -> bool:
    try:
        done = subprocess.run(
            [unshare, "-n", "--", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.cache
def _support(settings: WorkerSettings, visible: tuple[Path, ...]) -> Support:
    unshare = shutil.which("unshare")
    if unshare is not None and (
        settings.network_namespace == "off" or not network_namespace_works(unshare)
    ):
        unshare = None
    root = os.geteuid() == 0
    bwrap = bwrap_binary(settings) if settings.confinement in ("auto", "bwrap") else None
    why = "no `bwrap` (Debian package bubblewrap) on PATH" if bwrap is None else None
    if bwrap is not None:
        own_uid = root and shutil.which("setpriv") is not None
        why = _probe_bwrap(settings, bwrap, own_uid, visible)
        if why is None:
            if seccomp.supported():
                return Support("bwrap", bwrap, own_uid, True, unshare)
            reason = f"no seccomp deny-list for {platform.machine()}"
            return Support("bwrap", bwrap, own_uid, False, unshare, (reason,))
    if settings.confinement == "off":
        why = "confinement switched off (RLM_SANDBOX_CONFINEMENT=off)"
    elif settings.confinement == "unshare":
        why = "confinement limited to a network namespace (RLM_SANDBOX_CONFINEMENT=unshare)"
    mode: Mode = "unshare" if unshare is not None and settings.confinement != "off" else "none"
    return Support(mode, None, False, False, unshare, (why or "bwrap unavailable",))


def support(settings: WorkerSettings, visible: list[Path]) -> Support:
    """What confines sandboxes started with `settings` on this machine (probed once), with
    `visible` bound in."""
    return _support(settings, tuple(visible))


def check_allowed(settings: WorkerSettings, visible: list[Path]) -> Support:
    """`support(...)`, or SandboxStartError if a required layer is missing and neither
    RLM_SANDBOX_ALLOW_WEAKER nor an explicit 'bwrap' request lets it pass."""
    found = support(settings, visible)
    if settings.confinement == "bwrap" and found.mode != "bwrap":
        raise SandboxStartError(
            f"RLM_SANDBOX_CONFINEMENT=bwrap but bwrap cannot confine sandboxes here: "
            f"{'; '.join(found.problems)}"
        )
    if found.weaker and not settings.allow_weaker:
        raise SandboxStartError(
            "sandboxes would run with less isolation than required ("
            + "; ".join(found.problems)
            + "): install bubblewrap and allow user namespaces, or set "
            "RLM_SANDBOX_ALLOW_WEAKER=1 to run with less"
        )
    return found
