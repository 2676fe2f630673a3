"""One cell on a sandbox, its result checked against the bounds before anyone sees it.

The sandbox is untrusted: code in it can write frames of its own on its output pipe. A result
over its bounds (`result_violation`) or outside the protocol ends the sandbox, and the caller
gets a result that says so (`state_lost`), never the oversized values.
"""

from __future__ import annotations

import logging
import time

from rlm_wire.runtime_models import ExecutionError, ExecutionResult
from sandbox_runtime.errors import SandboxError
from sandbox_runtime.service.pool import quiet_kill
from sandbox_runtime.worker import SandboxProcess
from sandbox_runtime.worker.models import result_violation

logger = logging.getLogger(__name__)

#: Longest error message of a result the runtime makes itself.
_MESSAGE_CHARS = 4000


async def execute_bounded(
    process: SandboxProcess, code: str, *, timeout_s: float, output_bytes: int
) -> ExecutionResult:
    """`process.execute`, with a protocol failure or a result over its bounds turned into a
    lost-sandbox result (the process is killed)."""
    started = time.perf_counter()
    try:
        result = await process.execute(code, timeout_s=timeout_s, output_bytes=output_bytes)
    except SandboxError as exc:  # e.g. a malformed result frame
        await quiet_kill(process)
        return lost_result(type(exc).__name__, str(exc), time.perf_counter() - started)
    violation = result_violation(
        result, output_bytes=output_bytes, state_bytes=process.settings.state_bytes
    )
    if violation is None:
        return result
    logger.warning("sandbox result over its bounds", extra={"pid": process.pid, "what": violation})
    await quiet_kill(process)
    return lost_result(
        "SandboxProtocolError",
        f"the sandbox sent {violation}; it was ended",
        time.perf_counter() - started,
    )


def lost_result(kind: str, message: str, seconds: float) -> ExecutionResult:
    """The result of an execution whose sandbox was lost."""
    return ExecutionResult(
        stdout="",
        stderr="",
        error=ExecutionError(type=kind, message=message[:_MESSAGE_CHARS]),
        duration_ms=seconds * 1000,
        memory_bytes=0,
        state_lost=True,
    )
