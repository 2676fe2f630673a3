"""SandboxProcess: the supervisor's handle on one Deno + Pyodide sandbox process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from rlm_wire.runtime_models import ExecutionError, ExecutionResult, VarInfo

from ..errors import (
    SandboxCrashedError,
    SandboxError,
    SandboxGuestError,
    SandboxMemoryError,
    SandboxProtocolError,
    SandboxStartError,
    SandboxTimeoutError,
)
from . import blob as blob_format
from .framing import Frame, encode_frame, read_frame
from .launcher import Launched, launch, limit_resources, sandbox_pid
from .models import Bridge, LLMCall, LLMCallResult
from .settings import WorkerSettings
from .snapshot_cache import ensure_snapshot

logger = logging.getLogger(__name__)

_TRUNCATION_SLACK = 200
_EXIT_WAIT_S = 2.0
_OOM_MARKERS = ("out of memory", "Out of memory", "OOM", "RangeError: WebAssembly.Memory")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@functools.cache  # once per process: a pool starts many sandboxes alike
def _warn_snapshot_not_mapped() -> None:
    # Asked to map the snapshot and could not: each sandbox copies it (more memory).
    logger.warning("sandbox could not map the memory snapshot; copied instead")


class _Killed(Exception):
    """The request overran its grace period and the process was killed."""

    def __init__(self, grace_cpu_s: float | None = None) -> None:
        super().__init__()
        # CPU the process used between the interrupt and the kill: near the grace when the code
        # ran on through the interrupt, near zero when the machine gave it no time to stop.
        self.grace_cpu_s = grace_cpu_s


class SandboxProcess:
    """One sandbox process. Requests run one at a time; `kill` may be called at any moment."""

    bridge: Bridge | None

    def __init__(self, settings: WorkerSettings, launched: Launched, memory_limit: int) -> None:
        self.settings = settings
        self.bridge = None
        self.memory_limit = memory_limit
        self.last_skipped: list[str] = []
        #: Indexes whose contexts the last restored blob left out (bind them again).
        self.contexts_to_bind: list[int] = []
        self._launched = launched
        self._process = launched.process
        self._lock = asyncio.Lock()
        self._seq = 0
        self._pending_read: asyncio.Task[Frame | None] | None = None
        self._stderr_tail = bytearray()
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self._killed = False
        self._closed = False
        self._released = False
        self._deno_pid: int | None = None
        self._deno_start: int | None = None
        self._idle_watch: asyncio.Task[None] | None = None
        #: Why the supervisor killed the process, said to the next caller.
        self.kill_reason: str | None = None
        #: How the memory snapshot got into the sandbox's memory, as it said when ready:
        #: "mapped" (from the shared file), "read" (the mapping refused: copied from the file),
        #: "piped" (RLM_SANDBOX_MAP_SNAPSHOT off: its bytes over the pipe), None (cold start).
        self.snapshot_restore: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def spawn(
        cls, settings: WorkerSettings, *, memory_bytes: int | None = None
    ) -> SandboxProcess:
        """Start a sandbox: from the memory snapshot (made on first use), else cold."""
        snapshot = None
        if settings.use_snapshot:
            try:
                snapshot = await ensure_snapshot(settings)
            except (SandboxError, OSError) as exc:
                logger.warning(
                    "pyodide snapshot unavailable; cold start", extra={"error": str(exc)}
                )
        limit = memory_bytes or settings.memory_bytes
        launched = await launch(settings, memory_bytes=limit, snapshot_path=snapshot)
        process = cls(settings, launched, limit)
        try:
            frame = await process._next_frame(time.monotonic() + settings.start_timeout_s)
        except SandboxCrashedError as exc:
            await process.kill()
            raise SandboxStartError(f"sandbox process died while starting: {exc}") from exc
        except BaseException:  # e.g. cancelled: the process must not outlive its handle
            await process.kill()
            raise
        if frame is None:
            await process.kill()
            raise SandboxStartError(
                f"sandbox process not ready after {settings.start_timeout_s} s"
                f"{process._stderr_excerpt()}"
            )
        if frame.header.get("op") != "ready":
            await process.kill()
            raise SandboxStartError(f"unexpected first frame {frame.header.get('op')!r}")
        launched.interrupts.unlink()  # opened by the sandbox (bound, under bwrap): no name needed
        process.snapshot_restore = frame.header.get("snapshot")
        if process.snapshot_restore == "read":
            _warn_snapshot_not_mapped()
        # process.pid is learnt here, while bwrap is alive to tell it.
        logger.debug(
            "sandbox started", extra={"pid": process.pid, "snapshot": process.snapshot_restore}
        )
        if launched.wrapped.confined and not launched.wrapped.limits_set:
            limit_resources(process.pid, settings, limit)
        process._watch_idle()
        return process

    @classmethod
    async def restore(
        cls, settings: WorkerSettings, blob: bytes, *, memory_bytes: int | None = None
    ) -> SandboxProcess:
        """A new process holding the namespace saved by `hibernate` / `snapshot_namespace`.

        The blob is checked before the process is started. To restore without a start-up,
        `load_namespace` into a process that is already running (e.g. from a warm pool).
        """
        raw = await asyncio.to_thread(blob_format.unpack, blob, settings.max_blob_bytes)
        process = await cls.spawn(settings, memory_bytes=memory_bytes)
        try:
            await process._load_raw_namespace(raw)
        except BaseException:
            await process.kill()
            raise
        return process

    @property
    def pid(self) -> int:
        """The Deno process running the sandbox's code. Under bwrap it is bwrap's child (the
        process this supervisor started, `launcher_pid`); killing either ends the sandbox."""
        if self._deno_pid is None:
            self._deno_pid = sandbox_pid(self.launcher_pid)
            self._deno_start = _start_time(self._deno_pid)
        return self._deno_pid

    @property
    def launcher_pid(self) -> int:
        """The child this supervisor started (bwrap, or Deno itself when unconfined)."""
        return self._process.pid

    def footprint(self) -> int:
        """Resident memory of the whole process (every heap, Worker and buffer), in bytes."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _cpu_seconds(self) -> float | None:
        """CPU time of the Deno process so far, all threads (None once it is gone)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def _watch_idle(self) -> None:
        """Between requests nothing should run: a Worker or timer a cell left behind keeps
        the CPU busy; after `idle_cpu_strikes` busy samples in a row the process is killed
        (its session restarts on a fresh one, told that its state was lost)."""
        if self.alive and (self._idle_watch is None or self._idle_watch.done()):
            self._idle_watch = asyncio.create_task(self._idle_loop(), name="sandbox-idle-watch")

    def _stop_idle_watch(self) -> None:
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None

    async def _idle_loop(self) -> None:
        interval = self.settings.idle_cpu_check_s
        strikes = 0
        last = self._cpu_seconds()
        while last is not None and self.alive:
            await asyncio.sleep(interval)
            now = self._cpu_seconds()
            if now is None:
                return
            busy = now - last > self.settings.idle_cpu_cores * interval
            strikes = strikes + 1 if busy else 0
            last = now
            if strikes >= self.settings.idle_cpu_strikes:
                self.kill_reason = (
                    "the sandbox kept running after its execution returned (a Worker or timer "
                    "left behind); it was killed"
                )
                logger.warning("idle sandbox busy; killed", extra={"pid": self.pid})
                self._idle_watch = None  # this task ends with the kill below
                await self.kill()
                return

    @property
    def alive(self) -> bool:
        return self._process.returncode is None and not self._killed and not self._closed

    async def kill(self) -> None:
        """End the process now (SIGKILL); safe to call at any time, also during a request."""
        self._killed = True
        # Under bwrap Deno is bwrap's child: it is ended directly, not when it learns that
        # bwrap died, and waited for, so that its uid is free when this returns.
        deno = self._deno_pid if self._deno_pid != self.launcher_pid else None
        if deno is not None and _start_time(deno) == self._deno_start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(deno, signal.SIGKILL)
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()
        if deno is not None:
            for _ in range(int(_EXIT_WAIT_S / 0.01)):
                if _start_time(deno) != self._deno_start:  # gone (or reaped and reused)
                    break
                await asyncio.sleep(0.01)
        await self._release()

    async def aclose(self) -> None:
        """Ask the process to exit, killing it if it does not within a short wait."""
        if self._process.returncode is None and not self._killed and not self._lock.locked():
            with contextlib.suppress(OSError, RuntimeError):
                self._launched.writer.write(encode_frame({"op": "exit"}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), _EXIT_WAIT_S)
        self._closed = True
        await self.kill()

    async def _release(self) -> None:
        if self._idle_watch is not None and self._idle_watch is not asyncio.current_task():
            self._stop_idle_watch()
        if self._pending_read is not None and not self._pending_read.done():
            self._pending_read.cancel()
        if not self._released:
            self._released = True
            self._launched.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task

    # -- requests --------------------------------------------------------------------------

    async def execute(self, code: str, *, timeout_s: float, output_bytes: int) -> ExecutionResult:
        """Run a cell. Timeouts, crashes and kills come back as results, never as exceptions."""
        self._check_alive()
        async with self._lock:
            started = time.monotonic()
            request = {"op": "execute", "code": code, "output_bytes": output_bytes}
            try:
                frame, interrupted = await self._roundtrip(request, b"", timeout_s)
            except _Killed as exc:
                cpu = exc.grace_cpu_s
                used = "" if cpu is None else f" (it ran {cpu:.2f} s of CPU in that time)"
                return self._lost_result(
                    "TimeoutError",
                    f"execution exceeded {timeout_s:g} s and did not stop within "
                    f"{self.settings.grace_s:g} s of the interrupt{used}; the sandbox was killed",
                    started,
                )
            except SandboxCrashedError as exc:
                kind = "MemoryError" if isinstance(exc, SandboxMemoryError) else "SandboxCrashed"
                return self._lost_result(kind, str(exc), started)
            except SandboxProtocolError as exc:
                return self._lost_result("SandboxProtocolError", str(exc), started)
            return self._result(frame, interrupted, timeout_s, output_bytes, started)

    async def set_context(self, context: str | list[Any] | dict[str, Any], index: int = 0) -> None:
        """Bind `context_<index>` in the sandbox (index 0 is also `context`); the data travels
        as one frame, never as code."""
        if isinstance(context, str):
            header = {"op": "set_context", "kind": "str", "index": index}
            await self._control(header, context.encode("utf-8"))
            return
        payload = await asyncio.to_thread(_json_bytes, context)
        await self._control({"op": "set_context", "kind": "json", "index": index}, payload)

    async def set_state(self, state: dict[str, Any]) -> None:
        """Replace the shared `state` dict (JSON values, within settings.state_bytes)."""
        await self._control({"op": "set_state"}, _json_bytes(state))

    async def get_state(self) -> dict[str, Any]:
        frame = await self._control({"op": "get_state"})
        state = frame.header.get("state")
        if not isinstance(state, dict):
            raise SandboxProtocolError("state reply without a state object")
        return state

    async def list_vars(self) -> list[VarInfo]:
        frame = await self._control({"op": "list_vars"})
        try:
            return [VarInfo.model_validate(v) for v in frame.header.get("variables", [])]
        except ValidationError as exc:
            raise SandboxProtocolError(f"malformed variable list: {exc}") from exc

    async def set_context_bytes(
        self, payload: bytes, index: int, *, kind: Literal["str", "json"], rebind: bool
    ) -> None:
        """`set_context` from bytes as they are (the runtime's context cache holds them): a
        string's UTF-8 text (`kind` "str") or JSON. `rebind` after `load_namespace` of a blob
        taken with `contexts=False`: the context goes only where that blob left it out, never
        over a name the code rebound."""
        header = {"op": "set_context", "kind": kind, "index": index, "rebind": rebind}
        await self._control(header, payload)

    async def snapshot_namespace(self, *, contexts: bool = True) -> bytes:
        """The compressed namespace blob; the process keeps running. `contexts=False` leaves
        out the loaded contexts (still the objects loaded) for `set_context_json` to bind."""
        frame = await self._control({"op": "snapshot", "contexts": contexts})
        self.last_skipped = [str(n) for n in frame.header.get("skipped", [])]
        if self.last_skipped:
            logger.info(
                "namespace values not kept", extra={"pid": self.pid, "names": self.last_skipped}
            )
        level = self.settings.blob_compression_level
        return await asyncio.to_thread(blob_format.pack, frame.payload, level)

    async def load_namespace(self, blob: bytes) -> None:
        """Replace this process's namespace with the one in `blob` (`hibernate`'s format).

        Variables, cell definitions and imports of the blob replace whatever the process
        held; `state` and `context` come from the blob too. Names that could not be restored
        are in `last_skipped`. A bad blob raises `SandboxBlobError` (nothing was sent) or
        `SandboxGuestError` (the sandbox refused it, and its namespace may be half-loaded:
        kill the process rather than use it).
        """
        raw = await asyncio.to_thread(blob_format.unpack, blob, self.settings.max_blob_bytes)
        await self._load_raw_namespace(raw)

    async def _load_raw_namespace(self, raw: bytes) -> None:
        frame = await self._control({"op": "restore"}, raw)
        self.last_skipped = [str(n) for n in frame.header.get("skipped", [])]
        waiting = frame.header.get("contexts", [])
        if not isinstance(waiting, list) or not all(type(i) is int for i in waiting):
            raise SandboxProtocolError("restore reply with a malformed list of contexts")
        self.contexts_to_bind = waiting

    async def hibernate(self) -> bytes:
        """The compressed namespace blob, then the process exits."""
        blob = await self.snapshot_namespace()
        await self.aclose()
        return blob

    # -- internals -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self.alive:
            reason = f": {self.kill_reason}" if self.kill_reason else ""
            raise SandboxCrashedError(f"sandbox process {self.pid} is not running{reason}")

    async def _control(self, request: dict[str, Any], payload: bytes = b"") -> Frame:
        self._check_alive()
        timeout = self.settings.control_timeout_s
        async with self._lock:
            try:
                frame, interrupted = await self._roundtrip(request, payload, timeout)
            except _Killed as exc:
                raise SandboxTimeoutError(
                    f"{request['op']} exceeded {timeout:g} s; the sandbox was killed",
                    state_lost=True,
                ) from exc
        op = frame.header.get("op")
        if op == "error":
            if interrupted:
                raise SandboxTimeoutError(
                    f"{request['op']} exceeded {timeout:g} s and was interrupted", state_lost=False
                )
            raise SandboxGuestError(
                str(frame.header.get("type", "Error")), str(frame.header.get("message", ""))
            )
        if op == "result":
            await self.kill()
            raise SandboxProtocolError(f"unexpected {op!r} reply to {request['op']}")
        return frame

    async def _roundtrip(
        self, request: dict[str, Any], payload: bytes, timeout_s: float
    ) -> tuple[Frame, bool]:
        """Send a request; serve the sandbox's llm calls until its reply.

        On the deadline the request is interrupted; if no reply follows within grace_s the
        process is killed (`_Killed`). Returns the reply and whether it was interrupted.
        """
        self._seq += 1
        seq = self._seq
        deadline = time.monotonic() + timeout_s
        self._stop_idle_watch()
        try:
            return await self._exchange(request, payload, seq, deadline)
        except asyncio.CancelledError:
            # Its caller was cancelled mid-request: the sandbox still works on it, and its
            # reply would come to the next request. It is ended now (the kill shielded from
            # this cancellation), so the next use finds it gone and starts a fresh one.
            self.kill_reason = "its request was cancelled mid-way; it was killed"
            await asyncio.shield(self.kill())
            raise
        finally:
            self._watch_idle()

    async def _exchange(
        self, request: dict[str, Any], payload: bytes, seq: int, deadline: float
    ) -> tuple[Frame, bool]:
        interrupted = False
        cpu_at_interrupt: float | None = None
        await self._send({**request, "seq": seq}, payload, deadline)
        while True:
            frame = await self._next_frame(deadline)
            if frame is None:
                if interrupted:
                    cpu_now = self._cpu_seconds()
                    await self.kill()
                    if cpu_now is None or cpu_at_interrupt is None:
                        raise _Killed
                    raise _Killed(cpu_now - cpu_at_interrupt)
                interrupted = True
                deadline, cpu_at_interrupt = self._interrupt(seq)
                continue
            if frame.header.get("seq") != seq:
                # host.mjs names the request in each frame it sends during one: another
                # request's means the two sides no longer agree whose reply is whose, and a
                # reply read now would answer the wrong call. Nothing it says is trusted.
                await self.kill()
                raise SandboxProtocolError(
                    f"a frame of request {frame.header.get('seq')!r} came during request {seq}"
                )
            if frame.header["op"] != "llm_call":
                return frame, interrupted
            if interrupted:
                await self._send({"op": "llm_result", "interrupted": True}, b"", deadline)
                continue
            results = await self._serve_call(frame, deadline)
            if results is None:
                interrupted = True
                deadline, cpu_at_interrupt = self._interrupt(seq)
                await self._send({"op": "llm_result", "interrupted": True}, b"", deadline)
                continue
            reply = {"op": "llm_result", "results": [r.model_dump() for r in results]}
            await self._send(reply, b"", deadline)

    async def _serve_call(self, frame: Frame, deadline: float) -> list[LLMCallResult] | None:
        """Run the bridge for one llm_call frame; None if the deadline came first."""
        try:
            call = LLMCall.model_validate(frame.header.get("call"))
        except ValidationError as exc:
            raw = frame.header.get("call")
            prompts = raw.get("prompts") if isinstance(raw, dict) else None
            count = len(prompts) if isinstance(prompts, list) else 1
            return [_error_result("invalid_call", str(exc)[:500])] * max(count, 1)
        if self.bridge is None:
            return [_error_result("no_bridge", "this sandbox has no LLM bridge")] * len(
                call.prompts
            )
        # The bridge runs in this task under a timeout (no task of its own: this is the
        # per-llm_query hot path).
        timeout = asyncio.timeout(max(0.0, deadline - time.monotonic()))
        try:
            async with timeout:
                results = await self.bridge(call)
        except TimeoutError:
            if timeout.expired():
                return None
            logger.exception("llm bridge failed", extra={"pid": self.pid})
            return [_error_result("bridge_error", "the bridge timed out")] * len(call.prompts)
        except Exception as exc:  # bridge failures become LLMQueryError in the guest
            logger.exception("llm bridge failed", extra={"pid": self.pid})
            return [_error_result("bridge_error", f"{type(exc).__name__}: {exc}")] * len(
                call.prompts
            )
        if len(results) != len(call.prompts):
            return [_error_result("bridge_error", "wrong number of results")] * len(call.prompts)
        return results

    async def _send(self, header: dict[str, Any], payload: bytes, deadline: float) -> None:
        writer = self._launched.writer
        try:
            writer.write(encode_frame(header, payload))
            if writer.transport.get_write_buffer_size():  # else the pipe took it all at once
                await asyncio.wait_for(writer.drain(), max(0.001, deadline - time.monotonic()))
        except TimeoutError as exc:
            await self.kill()
            raise _Killed from exc
        except (ConnectionError, RuntimeError) as exc:
            raise self._crashed() from exc

    async def _next_frame(self, deadline: float) -> Frame | None:
        """The next frame from the sandbox, or None at the deadline (the read stays pending)."""
        if self._pending_read is None:
            self._pending_read = asyncio.create_task(
                read_frame(self._launched.reader, self.settings.max_frame_bytes)
            )
        task = self._pending_read
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            return None
        self._pending_read = None
        try:
            frame = task.result()
        except SandboxProtocolError:
            await self.kill()
            raise
        except asyncio.CancelledError as exc:
            raise self._crashed() from exc
        if frame is None:
            raise self._crashed()
        return frame

    def _crashed(self) -> SandboxCrashedError:
        code = self._process.returncode
        detail = "killed by the supervisor" if self._killed else f"exit status {code}"
        message = f"sandbox process {self.pid} ended ({detail}){self._stderr_excerpt()}"
        tail = bytes(self._stderr_tail).decode("utf-8", "replace")
        if any(marker in tail for marker in _OOM_MARKERS):
            return SandboxMemoryError(message)
        return SandboxCrashedError(message)

    def _interrupt(self, seq: int) -> tuple[float, float | None]:
        """Ask the sandbox to interrupt request `seq` (host.mjs polls its interrupt file);
        the end of its grace, and the process's CPU time now (see `_Killed`)."""
        if not self._released:
            self._launched.interrupts.interrupt(seq)
        return time.monotonic() + self.settings.grace_s, self._cpu_seconds()

    async def _drain_stderr(self) -> None:
        stream = self._process.stderr
        if stream is None:
            return
        while chunk := await stream.read(65536):
            self._stderr_tail += chunk
            del self._stderr_tail[: -self.settings.stderr_tail_bytes]

    def _stderr_excerpt(self) -> str:
        tail = bytes(self._stderr_tail[-2000:]).decode("utf-8", "replace").strip()
        return f": {tail}" if tail else ""

    def _result(
        self,
        frame: Frame,
        interrupted: bool,
        timeout_s: float,
        output_bytes: int,
        started: float,
    ) -> ExecutionResult:
        header = frame.header
        duration_ms = (time.monotonic() - started) * 1000
        if header["op"] == "error":
            fields: dict[str, Any] = {
                "stdout": "",
                "stderr": "",
                "error": {"type": header.get("type", "Error"), "message": header.get("message")},
                "memory_bytes": 0,
            }
        elif header["op"] == "result":
            fields = {k: header.get(k) for k in ("stdout", "stderr", "error", "final", "state")}
            # What the kernel says the process holds, not what the guest reports of its heap.
            fields["memory_bytes"] = self.footprint()
        else:
            raise SandboxProtocolError(f"unexpected {header['op']!r} reply to execute")
        if interrupted and fields["error"] is not None:
            error = dict(fields["error"])
            if error.get("type") in {"KeyboardInterrupt", "PythonError"}:
                error["type"] = "TimeoutError"
                error["message"] = f"execution exceeded {timeout_s:g} s and was interrupted"
            fields["error"] = error
        for stream in ("stdout", "stderr"):
            fields[stream] = _cap(str(fields[stream] or ""), output_bytes)
        try:
            return ExecutionResult.model_validate({**fields, "duration_ms": duration_ms})
        except ValidationError as exc:
            raise SandboxProtocolError(f"malformed execution result: {exc}") from exc

    def _lost_result(self, kind: str, message: str, started: float) -> ExecutionResult:
        return ExecutionResult(
            stdout="",
            stderr="",
            error=ExecutionError(type=kind, message=message),
            duration_ms=(time.monotonic() - started) * 1000,
            memory_bytes=0,
            state_lost=True,
        )


def _start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), None once it is gone or a zombie: with
    the pid, it names one process, not whichever reuses the number later."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _error_result(code: str, message: str) -> LLMCallResult:
    return LLMCallResult(error={"code": code, "message": message})


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _cap(text: str, limit: int) -> str:
    """The guest caps its own output; this bounds what a misbehaving guest could send."""
    if len(text) <= limit + _TRUNCATION_SLACK:
        return text
    return text[:limit] + "\n[output truncated by the supervisor]\n"


__all__ = ["SandboxProcess"]
