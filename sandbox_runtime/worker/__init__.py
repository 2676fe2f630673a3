"""The sandbox worker layer: one Deno + Pyodide process per sandbox, supervised from Python.

- `SandboxProcess.spawn` starts `deno run sandbox_runtime/js/host.mjs` with read access to the
  Pyodide package, our scripts, the snapshot file and its own pipes only (write access to its
  output pipe only; net, env, run, ffi and sys denied), a scrubbed environment, a bound on
  WebAssembly memory (`--wasm-max-mem-pages`), RLIMIT_NOFILE / RLIMIT_CORE, and an empty
  network namespace (`unshare -n`) where the machine allows it.
- Requests and replies are frames on dedicated pipes (`framing`); a third pipe carries
  interrupts to a watcher thread in the process, which raises KeyboardInterrupt in Python.
- The guest (`sandbox_runtime/guest`, imported inside Pyodide as `rlm_guest`) runs cells,
  captures output, carries llm_query calls to `SandboxProcess.bridge`, and pickles the
  namespace for hibernation (`blob` adds the compression; unpickling happens only inside).
- The Pyodide memory snapshot is made on first use and cached (`snapshot_cache`).
"""

from .models import Bridge, LLMCall, LLMCallResult
from .process import SandboxProcess
from .settings import WorkerSettings

__all__ = ["Bridge", "LLMCall", "LLMCallResult", "SandboxProcess", "WorkerSettings"]
