"""The sandbox worker layer: one Deno + Pyodide process per sandbox, supervised from Python.

- `SandboxProcess.spawn` starts `deno run sandbox_runtime/js/host.mjs` confined by the kernel
  (`confinement`: bubblewrap in its own mount, network, pid, ipc, uts and user namespaces, as
  a uid of its own where the runtime is root, with no capabilities and the `seccomp`
  deny-list; rlimits on data, CPU, files and processes), and inside that under Deno's
  permissions (read access to Pyodide, our scripts and its pipes only; net, env, run, ffi
  and sys denied), a scrubbed environment and a bound on WebAssembly memory. The memory
  snapshot arrives as the first frame on its request pipe.
- Requests and replies are frames on dedicated pipes (`framing`); interrupts are the number
  of the request to stop, written into a small file the sandbox polls while it runs Python
  (`launcher.InterruptFile`), which raises KeyboardInterrupt in it.
- The guest (`sandbox_runtime/guest`, imported inside Pyodide as `rlm_guest`) runs cells,
  captures output, carries llm_query calls to `SandboxProcess.bridge`, and pickles the
  namespace for hibernation (`blob` adds the compression; unpickling happens only inside).
- The Pyodide memory snapshot is made on first use and cached (`snapshot_cache`).
"""

from .models import Bridge, LLMCall, LLMCallResult
from .process import SandboxProcess
from .settings import WorkerSettings

__all__ = ["Bridge", "LLMCall", "LLMCallResult", "SandboxProcess", "WorkerSettings"]
