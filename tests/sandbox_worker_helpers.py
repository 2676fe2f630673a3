"""Shared pieces of the sandbox worker tests (real Deno + Pyodide processes)."""

from __future__ import annotations

import os
from pathlib import Path

from rlm_wire.runtime_models import ExecutionResult
from sandbox_runtime.worker import SandboxProcess, WorkerSettings
from sandbox_runtime.worker.launcher import sandbox_pid

# The product's grace (2 s) after a timeout's interrupt: a fresh sandbox on a loaded CI
# machine once took longer than 1 s to unwind its first KeyboardInterrupt.
SETTINGS = WorkerSettings(grace_s=2.0, control_timeout_s=30.0)
OUTPUT = 64 * 1024


async def run(process: SandboxProcess, code: str, timeout_s: float = 20.0) -> ExecutionResult:
    return await process.execute(code, timeout_s=timeout_s, output_bytes=OUTPUT)


async def ok(process: SandboxProcess, code: str, timeout_s: float = 20.0) -> str:
    """Run code that must succeed; its stdout."""
    result = await run(process, code, timeout_s)
    assert result.error is None, result.error
    return result.stdout


def child_pids() -> set[int]:
    """The sandboxes started by this test process: each child's Deno process (under bwrap,
    the child's own child), as `SandboxProcess.pid` names it."""
    me = str(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.add(sandbox_pid(int(entry.name)))
    return found
