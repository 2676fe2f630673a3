"""Shared pieces of the sandbox worker tests (real Deno + Pyodide processes)."""

from __future__ import annotations

from sandbox_runtime.protocol import ExecutionResult
from sandbox_runtime.worker import SandboxProcess, WorkerSettings

SETTINGS = WorkerSettings(grace_s=1.0, control_timeout_s=30.0)
OUTPUT = 64 * 1024


async def run(process: SandboxProcess, code: str, timeout_s: float = 20.0) -> ExecutionResult:
    return await process.execute(code, timeout_s=timeout_s, output_bytes=OUTPUT)


async def ok(process: SandboxProcess, code: str, timeout_s: float = 20.0) -> str:
    """Run code that must succeed; its stdout."""
    result = await run(process, code, timeout_s)
    assert result.error is None, result.error
    return result.stdout
