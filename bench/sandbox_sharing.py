"""What live Pyodide sessions can share: `python bench/sandbox_sharing.py [--sessions 1,2,4]`.

Two ways to hold N live sessions, measured in one run:

- **processes** (the product): N sandboxes started by `SandboxProcess.spawn`, each its own
  Deno process under bwrap, loaded from the memory snapshot over its pipe;
- **workers**: ONE Deno process, started with the product's command line (its Deno flags and
  permissions, `launcher.deno_argv`) and confinement (`confinement.wrap`: bwrap, seccomp,
  rlimits with the memory bound times N), whose host script starts one Web Worker per
  session; each worker loads Pyodide from the same snapshot file (a V8 isolate of its own,
  its own WebAssembly memory) and imports the guest as `host.mjs` does. V8 may share what is
  per process: the compiled WebAssembly module of identical bytes, the Deno binary, malloc.

For each, with glibc's allocator left to its defaults (`--malloc default`) and with the
product's `RLM_SANDBOX_MALLOC_TUNABLES` (`tuned`: one arena, big blocks mapped and given
back, set as `GLIBC_TUNABLES` in the sandbox's environment), it prints the
start time of each session, then PSS per session (the Deno processes' PSS from
/proc/<pid>/smaps_rollup, divided by N) once idle (one trivial statement run) and once
loaded (`bench/sandbox_worker.py`'s LOAD_SESSION run in every session; "load ms" is its wall
time per session, a rough check that a variant does not slow the code), with /proc/loadavg.
`--v8-flags` adds V8 flags to both (e.g. `--optimize-for-size`). The workers' host script
is this file's WORKERS_HOST / WORKERS_SESSION (bench-only code, written to a temporary
directory the sandbox may read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_worker import LOAD_SESSION, loadavg, memory_kib

from sandbox_runtime.worker import SandboxProcess, WorkerSettings, launcher
from sandbox_runtime.worker.confinement import Wrapped, wrap
from sandbox_runtime.worker.snapshot_cache import ensure_snapshot

#: glibc malloc as the product tunes it (RLM_SANDBOX_MALLOC_TUNABLES' default): one arena
#: (V8's background compile threads otherwise keep one each, full of freed zone memory),
#: blocks of 64 KiB and more mapped on their own (freed at once), the top trimmed past 64 KiB.
TUNED_MALLOC = WorkerSettings.model_fields["malloc_tunables"].default

#: The one-process host: reads JSON lines on stdin ({"op": "start"} starts one more session,
#: {"op": "run", "code": ...} runs code in every session, {"op": "exit"}), answers one JSON
#: line each on stdout.
WORKERS_HOST = r"""
const config = JSON.parse(Deno.args[0]);
const sessions = [];
const reply = (value) => console.log(JSON.stringify(value));
function ask(worker, message) {
  return new Promise((resolve, reject) => {
    worker.onmessage = (event) => resolve(event.data);
    worker.onerror = (event) => reject(new Error(event.message));
    worker.postMessage(message);
  });
}
async function* lines(stream) {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let cut;
    while ((cut = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, cut);
      pending = pending.slice(cut + 1);
    }
  }
}
for await (const line of lines(Deno.stdin.readable)) {
  const command = JSON.parse(line);
  if (command.op === "exit") break;
  if (command.op === "start") {
    const started = performance.now();
    const url = new URL("./session.mjs", import.meta.url).href;
    const worker = new Worker(url, { type: "module" });
    const answer = await ask(worker, { op: "load", ...config });
    sessions.push(worker);
    reply({ ...answer, ms: performance.now() - started });
  } else if (command.op === "run") {
    const message = { op: "run", code: command.code };
    reply({ op: "done", results: await Promise.all(sessions.map((w) => ask(w, message))) });
  }
}
Deno.exit(0);
"""

#: One session: Pyodide from the snapshot as the product loads it (`pyodide_load.mjs`, the
#: standard library from disk as `host.mjs` does), the guest imported as `host.mjs` does.
WORKERS_SESSION = r"""
let pyodide = null;
self.onmessage = async (event) => {
  const message = event.data;
  try {
    if (message.op === "load") {
      const url = new URL(`file://${message.pyodide_dir}/pyodide.mjs`).href;
      const { loadPyodide } = await import(url);
      const lean = new URL(`file://${message.js_dir}/pyodide_load.mjs`).href;
      const { loadPyodideLean, STDLIB_PLACEHOLDER, stdlibFromDisk } = await import(lean);
      const quiet = () => {};
      const options = {
        indexURL: `${message.pyodide_dir}/`, env: { HOME: "/home/pyodide" },
        stdout: quiet, stderr: quiet, stdLibURL: STDLIB_PLACEHOLDER,
      };
      const snapshot = Deno.readFileSync(message.snapshot_path);
      pyodide = await loadPyodideLean(loadPyodide, options, snapshot);
      stdlibFromDisk(pyodide, message.pyodide_dir);
      pyodide.FS.mkdirTree("/rlm/rlm_guest");
      for (const entry of Deno.readDirSync(message.guest_dir)) {
        if (entry.isFile && entry.name.endsWith(".py")) {
          const source = Deno.readFileSync(`${message.guest_dir}/${entry.name}`);
          pyodide.FS.writeFile(`/rlm/rlm_guest/${entry.name}`, source);
        }
      }
      pyodide.FS.writeFile("/rlm/rlm_repl.py", Deno.readFileSync(message.repl_path));
      pyodide.runPython("import sys\nsys.path.insert(0, '/rlm')\nimport rlm_guest.runtime");
      // host.mjs collects once before "ready" (Deno runs with --expose-gc): so does a worker.
      globalThis.gc?.({ type: "major", execution: "sync", flavor: "last-resort" });
      self.postMessage({ op: "ready" });
    } else if (message.op === "run") {
      pyodide.runPython(message.code);
      self.postMessage({ op: "done" });
    }
  } catch (error) {
    self.postMessage({ op: "error", message: String(error).slice(0, 2000) });
  }
};
"""


@dataclass(frozen=True, slots=True)
class Variant:
    """What a run changes in how the sandbox process starts (nothing: the product)."""

    malloc: str = "default"
    v8_flags: str = ""

    @property
    def env(self) -> dict[str, str]:
        # Empty: glibc's defaults (the product sets the variable from its settings).
        return {"GLIBC_TUNABLES": TUNED_MALLOC if self.malloc == "tuned" else ""}

    def argv(self, argv: list[str]) -> list[str]:
        if not self.v8_flags:
            return argv
        at = next(i for i, arg in enumerate(argv) if arg.startswith("--v8-flags="))
        return [*argv[:at], f"{argv[at]},{self.v8_flags}", *argv[at + 1 :]]

    @property
    def label(self) -> str:
        return self.malloc + (f" {self.v8_flags}" if self.v8_flags else "")


@contextlib.contextmanager
def launched_as(variant: Variant) -> Iterator[None]:
    """The product's launcher, with `variant`'s environment and V8 flags (restored after)."""
    env, argv = launcher.scrubbed_env, launcher.deno_argv

    def scrubbed_env(wrapped: Wrapped, settings: WorkerSettings) -> dict[str, str]:
        return {**env(wrapped, settings), **variant.env}

    def deno_argv(*args: Any, **kwargs: Any) -> list[str]:
        return variant.argv(argv(*args, **kwargs))

    launcher.scrubbed_env, launcher.deno_argv = scrubbed_env, deno_argv
    try:
        yield
    finally:
        launcher.scrubbed_env, launcher.deno_argv = env, argv


@dataclass(slots=True)
class Measured:
    """One setup's figures for N sessions."""

    starts_ms: list[float]
    #: Wall time of LOAD_SESSION per session (workers: run in all at once, divided by N).
    load_ms: float
    idle_mib: float
    loaded_mib: float
    pids: int


def pss_mib(pids: list[int]) -> float:
    return sum(memory_kib(pid)["Pss"] for pid in pids) / 1024


class WorkersProcess:
    """One confined Deno process holding sessions as Web Workers."""

    def __init__(self, process: asyncio.subprocess.Process, release: Callable[[], None]) -> None:
        self._process = process
        self._release = release

    @classmethod
    async def start(
        cls,
        settings: WorkerSettings,
        snapshot: Path,
        directory: Path,
        sessions: int,
        variant: Variant,
    ) -> WorkersProcess:
        host, copy = await asyncio.to_thread(prepare_directory, directory, snapshot)
        support = launcher.check_confinement(settings)
        visible = [*launcher.visible_paths(settings), directory]
        # The bounds the product gives one session, times the sessions the process holds.
        wrapped = wrap(settings, support, visible, memory_bytes=settings.memory_bytes * sessions)
        argv = launcher.deno_argv(
            settings,
            fd_in=0,
            fd_out=1,
            interrupt_path="/dev/null",  # its host script takes no interrupts
            memory_bytes=settings.memory_bytes,
            make_snapshot=False,
        )
        # The product's command line, with this bench's host script and its directory.
        script = argv.index(str(launcher.HOST_SCRIPT))
        argv[script:] = [str(host), json.dumps(session_config(settings, copy))]
        reads = next(i for i, arg in enumerate(argv) if arg.startswith("--allow-read="))
        argv[reads] += f",{directory}"
        process = await asyncio.create_subprocess_exec(
            *wrapped.prefix,
            *variant.argv(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**launcher.scrubbed_env(wrapped, settings), **variant.env},
            cwd="/",
            pass_fds=wrapped.pass_fds,
            start_new_session=True,
        )
        wrapped.close_fds()
        if not wrapped.limits_set and not wrapped.confined:
            launcher.limit_resources(process.pid, settings, settings.memory_bytes * sessions)
        return cls(process, wrapped.release)

    @property
    def pid(self) -> int:
        return launcher.sandbox_pid(self._process.pid)

    async def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self._process.stdin, self._process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("the workers' process has no pipes")
        stdin.write(json.dumps(command).encode() + b"\n")
        await stdin.drain()
        line = await asyncio.wait_for(stdout.readline(), 120)
        if not line:
            raise RuntimeError("the workers' process ended")
        answer: dict[str, Any] = json.loads(line)
        failed = [r for r in answer.get("results", [answer]) if r.get("op") == "error"]
        if failed:
            raise RuntimeError(f"a session failed: {failed[0]['message']}")
        return answer

    async def close(self) -> None:
        if self._process.returncode is None:
            self._process.kill()
        await self._process.wait()
        self._release()


def prepare_directory(directory: Path, snapshot: Path) -> tuple[Path, Path]:
    """The host script, the session script and a copy of the snapshot in `directory`,
    readable by the sandbox's own uid; returns the host script and the snapshot's copy."""
    host = directory / "host.mjs"
    host.write_text(WORKERS_HOST)
    (directory / "session.mjs").write_text(WORKERS_SESSION)
    copy = directory / "pyodide.snapshot"
    shutil.copyfile(snapshot, copy)
    for path in directory.iterdir():
        path.chmod(0o644)
    directory.chmod(0o755)
    return host, copy


def session_config(settings: WorkerSettings, snapshot: Path) -> dict[str, str]:
    return {
        "pyodide_dir": str(settings.pyodide_dir),
        "js_dir": str(launcher.JS_DIR),
        "guest_dir": str(launcher.GUEST_DIR),
        "repl_path": str(launcher.REPL_SCRIPT),
        "snapshot_path": str(snapshot),
    }


async def settle() -> None:
    """Let V8's background work (tier-up, sweeping) finish before reading memory."""
    await asyncio.sleep(2)


async def measure_workers(
    settings: WorkerSettings, snapshot: Path, sessions: int, variant: Variant
) -> Measured:
    with tempfile.TemporaryDirectory() as directory:
        host = await WorkersProcess.start(settings, snapshot, Path(directory), sessions, variant)
        try:
            started = time.perf_counter()
            starts = []
            for _ in range(sessions):
                answer = await host.ask({"op": "start"})
                starts.append(answer["ms"])
            # The first session's figure includes the process's own start.
            starts[0] = (time.perf_counter() - started) * 1000 - sum(starts[1:])
            await host.ask({"op": "run", "code": "1"})
            await settle()
            idle = pss_mib([host.pid]) / sessions
            started = time.perf_counter()
            await host.ask({"op": "run", "code": LOAD_SESSION})
            load_ms = (time.perf_counter() - started) * 1000 / sessions
            await host.ask({"op": "run", "code": "1"})
            await settle()
            loaded = pss_mib([host.pid]) / sessions
        finally:
            await host.close()
    return Measured(starts, load_ms, idle, loaded, 1)


async def measure_processes(settings: WorkerSettings, sessions: int, variant: Variant) -> Measured:
    processes: list[SandboxProcess] = []
    try:
        starts = []
        with launched_as(variant):
            for _ in range(sessions):
                started = time.perf_counter()
                processes.append(await SandboxProcess.spawn(settings))
                starts.append((time.perf_counter() - started) * 1000)
        await run_all(processes, "1")
        await settle()
        idle = pss_mib([p.pid for p in processes]) / sessions
        started = time.perf_counter()
        await run_all(processes, LOAD_SESSION)
        load_ms = (time.perf_counter() - started) * 1000 / sessions
        await run_all(processes, "1")
        await settle()
        loaded = pss_mib([p.pid for p in processes]) / sessions
    finally:
        for process in processes:
            await process.kill()
    return Measured(starts, load_ms, idle, loaded, sessions)


async def run_all(processes: list[SandboxProcess], code: str) -> None:
    for process in processes:
        result = await process.execute(code, timeout_s=60, output_bytes=4096)
        if result.error is not None:
            raise RuntimeError(f"session failed: {result.error}")


def print_row(setup: str, variant: Variant, sessions: int, measured: Measured) -> None:
    later = measured.starts_ms[1:]
    later_text = f"{statistics.median(later):7.0f}" if later else "      -"
    print(
        f"{setup:<10} {variant.label:<30} {sessions:>3} {measured.pids:>5} "
        f"{measured.starts_ms[0]:7.0f} {later_text}  {measured.idle_mib:10.1f} "
        f"{measured.loaded_mib:12.1f} {measured.load_ms:8.0f}   {loadavg()}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,2,4", help="comma-separated session counts")
    parser.add_argument("--setups", default="processes,workers")
    parser.add_argument("--malloc", default="default,tuned", help="default and/or tuned")
    parser.add_argument(
        "--v8-flags", default="", help="V8 flags added to the product's (e.g. --single-threaded)"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    variants = [Variant(malloc, args.v8_flags) for malloc in args.malloc.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        settings = WorkerSettings(cache_dir=Path(cache))
        snapshot = await ensure_snapshot(settings)
        print(f"snapshot {snapshot.stat().st_size / 2**20:.1f} MiB; load {loadavg()}")
        print(
            f"{'setup':<10} {'variant':<30}   N procs  1st ms next ms  idle/N MiB  "
            "loaded/N MiB  load ms  load"
        )
        runs: dict[str, Callable[[int, Variant], Awaitable[Measured]]] = {
            "processes": lambda n, v: measure_processes(settings, n, v),
            "workers": lambda n, v: measure_workers(settings, snapshot, n, v),
        }
        for variant in variants:
            for setup in args.setups.split(","):
                for sessions in counts:
                    print_row(setup, variant, sessions, await runs[setup](sessions, variant))


if __name__ == "__main__":
    asyncio.run(main())
