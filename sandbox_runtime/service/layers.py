"""The sandbox's isolation layers on this machine, said once, loudly, at start.

Every sandbox process runs under Deno's permissions, a bound on WebAssembly memory, kernel
rlimits and an idle-CPU watch wherever the runtime runs. Below Deno, bubblewrap gives it its
own uid, mount, network, pid, ipc and uts namespaces, no capabilities, no new privileges and
a seccomp deny-list (`sandbox_runtime.worker.confinement`). Where bwrap cannot run (e.g. a
container refusing user namespaces) the runtime refuses to start unless
RLM_SANDBOX_ALLOW_WEAKER=1; this report says which layers are in force. It is kept on the
runtime (`Runtime.isolation`) for /health.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sandbox_runtime.errors import SandboxStartError
from sandbox_runtime.worker import WorkerSettings
from sandbox_runtime.worker.confinement import TMP_BYTES, Support, data_limit
from sandbox_runtime.worker.launcher import c_library, check_confinement, confinement_support
from sandbox_runtime.worker.page_merging import status as page_merging_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of isolation around each sandbox process, and whether it is in place."""

    name: str
    active: bool
    detail: str


@dataclass(frozen=True, slots=True)
class IsolationReport:
    """The layers this runtime's sandboxes run under."""

    layers: tuple[Layer, ...]
    #: Required layers are missing and RLM_SANDBOX_ALLOW_WEAKER let sandboxes start anyway.
    weaker: bool = False

    @property
    def missing(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if not layer.active)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": {
                layer.name: {"active": layer.active, "detail": layer.detail}
                for layer in self.layers
            },
            "missing": [layer.name for layer in self.missing],
            "weaker_allowed": self.weaker,
        }


def _bwrap_layers(support: Support) -> list[Layer]:
    on = support.mode == "bwrap"
    off = "no bwrap: " + "; ".join(support.problems)
    if support.own_uid and on:
        uid = "each sandbox runs as a uid (and gid) of its own, owning no file"
    elif on:
        uid = "sandboxes run as the runtime's uid inside a user namespace (not root)"
    else:
        uid = off
    return [
        Layer(
            "confinement",
            on,
            f"bubblewrap ({support.bwrap})" if on else f"{support.mode}: {off}",
        ),
        Layer("own_uid", on and support.own_uid, uid),
        Layer(
            "mount_namespace",
            on,
            "only Deno, its libraries, Pyodide, the guest and the REPL are visible, read-only; "
            f"a {TMP_BYTES // 2**20} MiB tmpfs /tmp; no host path is writable"
            if on
            else off,
        ),
        Layer(
            "pid_ipc_uts_namespaces",
            on,
            "its own pid, ipc, uts and cgroup namespaces; no new user namespaces" if on else off,
        ),
        Layer(
            "no_new_privileges",
            on,
            "all capabilities dropped, PR_SET_NO_NEW_PRIVS, its own session" if on else off,
        ),
        Layer(
            "seccomp",
            on and support.seccomp,
            "deny-list: ptrace, mount, keyctl, bpf, perf_event_open, userfaultfd, io_uring, "
            "modules, chmod/chown and more (EPERM)"
            if on and support.seccomp
            else "; ".join(support.problems) or off,
        ),
    ]


def _network_namespace(settings: WorkerSettings, support: Support) -> Layer:
    name = "network_namespace"
    if support.mode == "bwrap":
        return Layer(name, True, "an empty network namespace (bwrap --unshare-net)")
    if support.mode == "unshare":
        return Layer(name, True, "an empty network namespace (unshare -n)")
    if settings.network_namespace == "off" or settings.confinement == "off":
        return Layer(name, False, "switched off; Deno's --deny-net only")
    return Layer(name, False, "`unshare -n` refused here; Deno's --deny-net only")


def _deno_permissions(settings: WorkerSettings) -> Layer:
    detail = "reads Pyodide and the runtime's scripts only; net, env, run, sys denied; ffi "
    library = c_library(settings.deno_path) if settings.map_snapshot else None
    if library is None:
        detail += "denied (the memory snapshot is copied)"
    else:
        detail += f"for {library} alone, to map the memory snapshot, revoked before guest code"
    return Layer("deno_permissions", True, detail)


def _page_merging(settings: WorkerSettings) -> Layer:
    """Missing (weaker isolation, said at start) while sandboxes opt in to KSM, whether or not
    the machine's ksmd runs now: it may be started later."""
    merging = page_merging_status(settings.merge_pages)
    return Layer("no_page_merging", not merging.opted_in, merging.detail)


def isolation_layers(settings: WorkerSettings) -> IsolationReport:
    """Which layers sandboxes started with `settings` get on this machine."""
    support = confinement_support(settings)
    return IsolationReport(
        (
            _deno_permissions(settings),
            *_bwrap_layers(support),
            _network_namespace(settings, support),
            Layer(
                "wasm_memory_bound",
                True,
                f"--wasm-max-mem-pages (default {settings.memory_bytes} bytes)",
            ),
            Layer(
                "memory_limit",
                True,
                f"rlimit: RLIMIT_DATA = WebAssembly bound + {settings.memory_headroom_bytes} "
                f"bytes (default {data_limit(settings, settings.memory_bytes)}); past it "
                "allocations fail or the process dies and is replaced",
            ),
            Layer(
                "rlimits",
                True,
                f"RLIMIT_CPU={settings.cpu_seconds} s, RLIMIT_NOFILE={settings.max_open_files}, "
                "RLIMIT_CORE=0"
                + (f", RLIMIT_NPROC={settings.max_threads}" if support.own_uid else ""),
            ),
            Layer(
                "idle_cpu_watch",
                True,
                f"a sandbox using over {settings.idle_cpu_cores:g} cores for "
                f"{settings.idle_cpu_strikes} samples of {settings.idle_cpu_check_s:g} s while "
                "idle (a Worker or timer left behind) is killed and replaced",
            ),
            _page_merging(settings),
        ),
        weaker=support.weaker,
    )


def report_isolation(settings: WorkerSettings) -> IsolationReport:
    """Check the layers and log them in one line: INFO when all are in place, WARNING when
    some are missing and RLM_SANDBOX_ALLOW_WEAKER allows it.

    Raises `SandboxStartError` when a required layer is missing without that consent.
    """
    report = isolation_layers(settings)
    fields = {"isolation": report.as_dict()}
    if not report.missing:
        logger.info("sandbox isolation: every layer in place", extra=fields)
        return report
    names = ", ".join(f"{layer.name} ({layer.detail})" for layer in report.missing)
    try:
        check_confinement(settings)
    except SandboxStartError:
        logger.error("sandbox isolation: missing %s", names, extra=fields)
        raise
    logger.warning("sandbox isolation: missing %s", names, extra=fields)
    return report
