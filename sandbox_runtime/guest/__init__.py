"""Python that runs INSIDE Pyodide: the Pyodide side of the REPL, and the request loop.

The REPL itself is `rlm_repl.py` (the one every environment runs); these modules give it a
transport over the supervisor's pipe (`host`), a `__main__` module to run in and the
interrupt-aware `time.sleep` (`session`), hibernation (`namespace`), and serve the
supervisor's request frames (`runtime`). The Deno host (`sandbox_runtime/js/host.mjs`) writes
them into Pyodide's in-memory file system as the package `rlm_guest`, next to `rlm_repl.py`,
and imports them there. They import only the standard library and `rlm_repl` (always as a
module, `rlm_repl.X`, so that a reload of it reaches them), so CPython can test them too.
"""
