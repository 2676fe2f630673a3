"""Settings of the sandbox worker layer (one Deno + Pyodide process per sandbox)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "rlm-broker" / "sandbox"


def _default_deno_path() -> Path:
    # The PyPI package `deno` (pinned in uv.lock) ships the binary beside the interpreter.
    from deno import find_deno_bin

    return Path(find_deno_bin())


class WorkerSettings(BaseSettings):
    """How sandbox processes are started and bounded. Environment prefix: RLM_SANDBOX_."""

    model_config = SettingsConfigDict(env_prefix="RLM_SANDBOX_", frozen=True, extra="ignore")

    deno_path: Path = Field(
        default_factory=_default_deno_path,
        description="The Deno binary (default: from the PyPI package `deno`, pinned in uv.lock).",
    )
    pyodide_dir: Path = Field(
        _PROJECT_ROOT / "node_modules" / "pyodide",
        description="The npm `pyodide` package directory, installed by `deno install` from "
        "deno.lock (the sandbox may read it, nothing else).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the Pyodide memory snapshot is kept (keyed by the exact Pyodide build).",
    )
    use_snapshot: bool = Field(
        True, description="Start sandboxes from the memory snapshot (made on first use)."
    )
    snapshot_cache_keep: int = Field(
        3,
        ge=1,
        le=100,
        description="Memory snapshots kept in the cache dir (~30 MB each), the most recently "
        "used: an upgrade of Pyodide or of the sandbox's scripts, and each copy of the project "
        "sharing the directory, makes its own. The others are removed when a new one is made; "
        "a copy whose snapshot was removed makes it again (~3 s) at its next start.",
    )
    memory_bytes: int = Field(
        512 * 2**20,
        ge=64 * 2**20,
        le=4 * 2**30,
        description="Default bound on a sandbox's WebAssembly memory (V8 --wasm-max-mem-pages).",
    )
    wasm_optimizing_compiler: bool = Field(
        False,
        description="Whether V8 may recompile hot WebAssembly (CPython itself) with its "
        "optimizing compiler, TurboFan. Off (V8 --liftoff-only, and --no-wasm-inlining: no call "
        "feedback collected for a compiler that never runs): a loaded session costs ~46 "
        "MiB less (~72 MiB PSS instead of ~118: compiling CPython's large functions leaves "
        "their memory behind) and a compute-heavy cell takes ~1.55x as long; on for sessions "
        "that mostly compute, with RLM_SANDBOX_WASM_TIERING_BUDGET (docs/performance.md).",
    )
    wasm_tiering_budget: int = Field(
        2_000_000_000,
        ge=1,
        le=2**31 - 1,
        description="With RLM_SANDBOX_WASM_OPTIMIZING_COMPILER, V8 --wasm-tiering-budget of "
        "each sandbox: roughly how many bytes of WebAssembly a function runs before V8 "
        "recompiles it with its optimizing compiler (on background threads). V8's own, "
        "13000000, makes a fresh sandbox spend ~1.5 s of CPU compiling what its start-up ran, "
        "while its first executions mostly wait on llm_query; the default leaves optimizing "
        "to code that runs hot for real (docs/performance.md).",
    )
    malloc_tunables: str = Field(
        "glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=65536",
        pattern=r"^[A-Za-z0-9_.=:]*$",
        max_length=512,
        description="GLIBC_TUNABLES of each sandbox process (Deno's native allocations): one "
        "malloc arena instead of one per thread, and freed memory given back to the kernel "
        "sooner. glibc's defaults left ~30-50 MiB per loaded session allocated and unused "
        "(docs/performance.md). Empty: glibc's own.",
    )
    map_snapshot: bool = Field(
        True,
        description="Sandboxes map the memory snapshot copy-on-write from one sealed memory "
        "file the runtime holds (Linux memfd) instead of each copying it: the pages a "
        "session has not written are kept once for all sandboxes (a loaded session ~3 MiB "
        "less, an idle one ~8 MiB less, six live). The sandbox maps it through the C "
        "library, with Deno's FFI permission for that file alone, revoked before any guest "
        "code runs; off: no FFI permission at all, and the snapshot is copied.",
    )
    merge_pages: bool = Field(
        False,
        description="Let the kernel keep one copy of the pages that sandboxes hold alike (KSM: "
        "prctl PR_SET_MEMORY_MERGE, Linux 6.4+; the machine's ksmd must be running). A loaded "
        "session then costs ~35-45 % less PSS. Off by default: it is a timing side channel "
        "between sessions (a guest can tell whether another sandbox holds a page it built), so "
        "only for sessions of one tenant or of tenants that trust each other (docs/sandbox.md).",
    )
    grace_s: float = Field(
        2.0, gt=0, description="After a timeout's interrupt, how long before the process is killed."
    )
    start_timeout_s: float = Field(
        60.0, gt=0, description="Time for a process to report ready (cold start is ~2.5 s of CPU)."
    )
    control_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time limit of control operations (context, state, vars, hibernate, restore).",
    )
    state_bytes: int = Field(
        1 * 2**20, ge=1024, description="Bound on the JSON size of the shared `state` dict."
    )
    max_frame_bytes: int = Field(
        1 * 2**30, ge=2**20, description="Largest frame accepted from a sandbox process."
    )
    max_blob_bytes: int = Field(
        1 * 2**30,
        ge=2**20,
        description="Largest decompressed hibernation blob accepted by restore.",
    )
    blob_compression_level: int = Field(
        6, ge=1, le=9, description="zlib level of hibernation blobs."
    )
    network_namespace: Literal["auto", "require", "off"] = Field(
        "auto",
        description="Run each sandbox in an empty network namespace (`unshare -n`): 'auto' when "
        "the machine allows it, 'require' to refuse to start without it, 'off' never.",
    )
    confinement: Literal["auto", "bwrap", "unshare", "off"] = Field(
        "auto",
        description="What confines each sandbox process below Deno: 'bwrap' (bubblewrap: its "
        "own uid, a mount namespace showing only Deno, Pyodide and the guest read-only, empty "
        "network, pid, ipc and uts namespaces, no capabilities, no new privileges, a seccomp "
        "deny-list), 'unshare' (an empty network namespace only), 'off', or 'auto' (bwrap "
        "where it works, else unshare). Anything less than bwrap needs RLM_SANDBOX_ALLOW_WEAKER.",
    )
    allow_weaker: bool = Field(
        False,
        description="Start sandboxes even when a required layer (bwrap confinement, seccomp) "
        "cannot be had here, e.g. in an unprivileged container; /health lists what is missing. "
        "Without it the runtime refuses to start.",
    )
    bwrap_path: Path | None = Field(
        None, description="The bubblewrap binary (default: `bwrap` on PATH)."
    )
    uid_base: int = Field(
        900_000,
        ge=1000,
        le=2**31 - 2**16,
        description="When the runtime runs as root, each sandbox runs as its own uid (and gid) "
        "from this range, owning no file; otherwise as the runtime's uid in a user namespace.",
    )
    uid_count: int = Field(4096, ge=1, le=2**16, description="Size of the range of sandbox uids.")
    memory_headroom_bytes: int = Field(
        1024 * 2**20,
        ge=768 * 2**20,
        description="RLIMIT_DATA of a sandbox process is its WebAssembly bound plus this. V8 "
        "maps a 512 MiB writable code range for its isolate, ~0.6 GiB of data at rest; "
        "ArrayBuffers, Workers and extra WebAssembly.Memory objects count against what is "
        "left.",
    )
    cpu_seconds: int = Field(
        3600,
        ge=10,
        description="RLIMIT_CPU of a sandbox process: CPU seconds over its whole life (all "
        "threads), then the kernel kills it.",
    )
    max_threads: int = Field(
        256,
        ge=64,
        description="RLIMIT_NPROC of a sandbox's own uid (threads count); applied when the "
        "sandbox has its own uid.",
    )
    idle_cpu_check_s: float = Field(
        1.0,
        gt=0,
        description="While a sandbox runs no request, its CPU use is sampled this often.",
    )
    idle_cpu_cores: float = Field(
        0.1,
        gt=0,
        le=1,
        description="An idle sample counts as busy above this CPU use (in cores; an idle "
        "sandbox uses ~0, a spinning Worker on a loaded machine may get only a third of one).",
    )
    idle_cpu_strikes: int = Field(
        3,
        ge=1,
        description="A sandbox busy for this many idle samples in a row is running work a cell "
        "left behind (a Worker, a timer): it is killed and its session restarts on a new one.",
    )
    max_open_files: int = Field(256, ge=64, description="RLIMIT_NOFILE of a sandbox process.")
    stderr_tail_bytes: int = Field(
        16 * 1024, ge=1024, description="How much of a sandbox's stderr is kept to explain crashes."
    )
