"""Python that runs INSIDE Pyodide: the sandbox's namespace, its functions, and the request loop.

These modules are read from disk by the Deno host (`sandbox_runtime/js/host.mjs`), written into
Pyodide's in-memory file system as the package `rlm_guest`, and imported there. They import only
the standard library (and `pyodide` lazily), so CPython can import and test them as well.
"""
