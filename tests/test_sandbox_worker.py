"""SandboxProcess against real Deno + Pyodide: REPL semantics, state, bridge, FINAL, context."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox_runtime.errors import SandboxBlobError, SandboxCrashedError, SandboxGuestError
from sandbox_runtime.worker import LLMCall, LLMCallResult, SandboxProcess, WorkerSettings, blob
from sandbox_runtime.worker.confinement import SANDBOX_DENO_DIR
from sandbox_runtime.worker.launcher import (
    INTERRUPT_FILE_PREFIX,
    InterruptFile,
    sandbox_pid,
    sweep_left_interrupt_files,
)
from sandbox_runtime.worker.snapshot_cache import ensure_snapshot, pyodide_version, snapshot_path
from sandbox_runtime.worker.snapshot_memory import PAGE, snapshot_bytes, snapshot_memory
from tests.sandbox_worker_helpers import SETTINGS, ok, run


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def sandbox(anyio_backend: str) -> AsyncIterator[SandboxProcess]:
    process = await SandboxProcess.spawn(SETTINGS)
    yield process
    await process.aclose()


@pytest.fixture
async def fresh(anyio_backend: str) -> AsyncIterator[SandboxProcess]:
    process = await SandboxProcess.spawn(SETTINGS)
    yield process
    await process.kill()


pytestmark = pytest.mark.anyio


async def test_variables_persist_and_last_expression_is_echoed(sandbox: SandboxProcess) -> None:
    assert await ok(sandbox, "counter = 41\ndef bump(n):\n    return n + 1") == ""
    assert await ok(sandbox, "print('value:', bump(counter))\ncounter + 1") == "value: 42\n42\n"
    result = await run(sandbox, "counter = bump(counter)\nNone")
    assert result.stdout == ""
    assert result.memory_bytes > 0
    assert result.duration_ms > 0
    assert await ok(sandbox, "counter") == "42\n"


async def test_errors_carry_type_message_and_user_traceback(sandbox: SandboxProcess) -> None:
    result = await run(sandbox, "def f():\n    return 1 / 0\nprint('before')\nf()")
    assert result.stdout == "before\n"
    assert result.error is not None
    assert result.error.type == "ZeroDivisionError"
    assert result.error.traceback is not None
    assert "return 1 / 0" in result.error.traceback
    assert "rlm_guest" not in result.error.traceback
    syntax = await run(sandbox, "def (:")
    assert syntax.error is not None
    assert syntax.error.type == "SyntaxError"
    stderr = await run(sandbox, "import sys; print('oops', file=sys.stderr)")
    assert stderr.stderr == "oops\n"


async def test_output_flood_is_truncated_with_a_marker(sandbox: SandboxProcess) -> None:
    result = await sandbox.execute(
        "for i in range(100_000):\n    print('line', i)", timeout_s=20, output_bytes=2048
    )
    assert result.error is None
    assert len(result.stdout.encode()) < 2048 + 200
    assert result.stdout.startswith("line 0\nline 1\n")
    assert "[output truncated" in result.stdout


async def test_final_final_var_and_answer(sandbox: SandboxProcess) -> None:
    result = await run(sandbox, "FINAL('the answer is 42')")
    assert result.final == {"value": "the answer is 42", "source": "FINAL"}
    result = await run(sandbox, "report = {'n': 3}\nFINAL_VAR('report')")
    assert result.final == {"value": "{'n': 3}", "source": "FINAL_VAR", "name": "report"}
    result = await run(sandbox, "FINAL_VAR(report)")
    assert result.final == {"value": "{'n': 3}", "source": "FINAL_VAR", "name": "report"}
    missing = await run(sandbox, "FINAL_VAR('no_such_variable')")
    assert missing.error is not None
    assert missing.error.type == "NameError"
    assert missing.final is None
    assert (await run(sandbox, "x = 1")).final is None
    result = await run(sandbox, "answer['content'] = 'done'\nanswer['ready'] = True")
    assert result.final == {"value": "done", "source": "answer"}
    await ok(sandbox, "answer['ready'] = False")


async def test_show_vars_and_list_vars(sandbox: SandboxProcess) -> None:
    await ok(sandbox, "names = ['a', 'b', 'c']\nimport json")
    listing = await ok(sandbox, "SHOW_VARS()")
    assert "names: list = ['a', 'b', 'c']" in listing
    variables = {v.name: v for v in await sandbox.list_vars()}
    assert variables["names"].type == "list"
    assert variables["names"].size == 3
    assert "json" not in variables  # modules are not variables
    assert "llm_query" not in variables
    assert {"context", "state", "answer"} <= set(variables)


async def test_state_dict_round_trips_and_is_bounded(sandbox: SandboxProcess) -> None:
    await sandbox.set_state({"seen": [1, 2], "note": "hi"})
    result = await run(sandbox, "state['seen'].append(3)")
    assert result.state == {"seen": [1, 2, 3], "note": "hi"}
    assert await sandbox.get_state() == {"seen": [1, 2, 3], "note": "hi"}
    bad = await run(sandbox, "state['f'] = object()")
    assert bad.error is not None
    assert bad.error.type == "StateError"
    huge = await run(sandbox, "del state['f']\nstate['big'] = 'x' * 2_000_000")
    assert huge.error is not None
    assert huge.error.type == "StateError"
    await ok(sandbox, "del state['big']")
    with pytest.raises(SandboxGuestError):
        await sandbox.set_state({"big": "x" * 2_000_000})


async def test_large_context_arrives_without_code(sandbox: SandboxProcess) -> None:
    text = "abcdefghij" * 2_000_000 + "END"
    await sandbox.set_context(text)
    assert await ok(sandbox, "print(len(context), context[-3:])") == f"{len(text)} END\n"
    await sandbox.set_context({"docs": ["one", "two"], "n": 2})
    assert await ok(sandbox, "print(context['docs'][1], context['n'])") == "two 2\n"
    await sandbox.set_context(["x", 1])
    assert await ok(sandbox, "context") == "['x', 1]\n"


async def test_time_sleep_waits_without_breaking(sandbox: SandboxProcess) -> None:
    out = await ok(
        sandbox,
        "import time\nt = time.monotonic()\ntime.sleep(0.2)\nprint(time.monotonic() - t >= 0.19)",
    )
    assert out == "True\n"


async def test_two_processes_do_not_share_state(
    sandbox: SandboxProcess, fresh: SandboxProcess
) -> None:
    await ok(sandbox, "secret_value = 'only here'")
    other = await run(fresh, "secret_value")
    assert other.error is not None
    assert other.error.type == "NameError"
    assert fresh.pid != sandbox.pid


class RecordingBridge:
    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.calls: list[LLMCall] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, call: LLMCall) -> list[LLMCallResult]:
        self.calls.append(call)
        await asyncio.sleep(self.delay)
        if self.fail:
            return [LLMCallResult(error={"code": "upstream", "message": "model down"})] * len(
                call.prompts
            )
        return [
            LLMCallResult(
                response=f"{call.kind}:{p if isinstance(p, str) else json.dumps(p)}",
                state={"child": i} if call.kind == "rlm" else None,
            )
            for i, p in enumerate(call.prompts)
        ]


async def test_llm_query_goes_through_the_bridge(sandbox: SandboxProcess) -> None:
    bridge = RecordingBridge()
    sandbox.bridge = bridge
    try:
        out = await ok(sandbox, "print(llm_query('hello', model='small'))")
        assert out == "llm:hello\n"
        assert bridge.calls[-1] == LLMCall(kind="llm", prompts=["hello"], model="small")
        code = "print(llm_query_batched(['a', 'b', [{'role': 'user', 'content': 'c'}]]))"
        out = await ok(sandbox, code)
        assert out == '[\'llm:a\', \'llm:b\', \'llm:[{"role": "user", "content": "c"}]\']\n'
        assert len(bridge.calls) == 2
        assert bridge.calls[-1].batched is True
        assert len(bridge.calls[-1].prompts) == 3
        await sandbox.set_state({"parent": True})
        result = await run(sandbox, "print(rlm_query_batched(['x', 'y']))")
        assert result.stdout == "['rlm:x', 'rlm:y']\n"
        assert bridge.calls[-1].state == {"parent": True}
        assert result.state == {"parent": True, "child": 1}
    finally:
        sandbox.bridge = None


async def test_llm_errors_raise_in_python(sandbox: SandboxProcess) -> None:
    sandbox.bridge = RecordingBridge(fail=True)
    try:
        result = await run(sandbox, "llm_query('hello')")
        assert result.error is not None
        assert result.error.type == "LLMQueryError"
        assert "model down" in result.error.message
        out = await ok(
            sandbox,
            "try:\n    llm_query_batched(['a', 'b'])\nexcept LLMQueryError as e:\n"
            "    print(e.code, e.index, e.partial)",
        )
        assert out == "upstream 0 [None, None]\n"
    finally:
        sandbox.bridge = None
    result = await run(sandbox, "llm_query('no bridge now')")
    assert result.error is not None
    assert result.error.type == "LLMQueryError"
    assert "no_bridge" in result.error.message
    bad = await run(sandbox, "llm_query(42)")
    assert bad.error is not None
    assert bad.error.type == "TypeError"


async def test_blocking_llm_query_times_out_and_keeps_state(sandbox: SandboxProcess) -> None:
    sandbox.bridge = RecordingBridge(delay=30)
    try:
        await ok(sandbox, "kept = 'yes'")
        result = await run(sandbox, "llm_query('slow')", timeout_s=0.5)
        assert result.error is not None
        assert result.error.type == "TimeoutError"
        assert not result.state_lost
    finally:
        sandbox.bridge = None
    assert await ok(sandbox, "kept") == "'yes'\n"


async def test_hibernate_and_restore_keep_variables_functions_classes(
    fresh: SandboxProcess,
) -> None:
    await ok(
        fresh,
        "import json as j\nimport re\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
        "    def norm2(self):\n        return self.x ** 2 + self.y ** 2\n"
        "def double(v):\n    return 2 * v\n"
        "points = [Point(1, 2), Point(3, 4)]\nalias = points\n"
        "table = {'k': list(range(1000))}\nhandlers = [double]\n"
        "lam = lambda: 1\ngen = (i for i in range(3))\n",
    )
    await fresh.set_state({"s": 1})
    await fresh.set_context("ctx" * 1000)
    blob = await fresh.hibernate()
    assert not fresh.alive
    assert sorted(fresh.last_skipped) == ["gen", "lam"]
    assert len(blob) < 1_000_000
    restored = await SandboxProcess.restore(SETTINGS, blob)
    try:
        out = await ok(
            restored,
            "print(points[1].norm2(), double(21), handlers[0](2), alias is points)\n"
            "print(j.dumps(table['k'][:3]), re.sub('a', 'b', 'aa'), len(context), state)\n"
            "print(isinstance(points[0], Point), 'lam' in globals())",
        )
        assert out == "25 42 4 True\n[0, 1, 2] bb 3000 {'s': 1}\nTrue False\n"
        again = await SandboxProcess.restore(SETTINGS, await restored.snapshot_namespace())
        try:
            assert await ok(again, "double(points[0].norm2())") == "10\n"
        finally:
            await again.kill()
        assert restored.alive
    finally:
        await restored.kill()


async def test_load_namespace_into_a_running_process(
    sandbox: SandboxProcess, fresh: SandboxProcess
) -> None:
    await ok(
        fresh,
        "import math\nclass Box:\n    def __init__(self, v):\n        self.v = v\n"
        "def area(r):\n    return round(math.pi * r * r, 2)\nbox = Box([1, 2])\n"
        "state['step'] = 7\nFINAL('done')",
    )
    await fresh.set_context({"doc": "abc"})
    saved = await fresh.snapshot_namespace()
    pid = sandbox.pid
    await ok(sandbox, "leftover = 'from before'")
    await sandbox.load_namespace(saved)
    assert sandbox.pid == pid and sandbox.alive
    out = await ok(
        sandbox,
        "print(area(1), box.v, isinstance(box, Box), context['doc'], state)\n"
        "print('leftover' in globals())",
    )
    assert out == "3.14 [1, 2] True abc {'step': 7}\nFalse\n"
    # A refused blob leaves the process running and its namespace as it was.
    with pytest.raises(SandboxBlobError):
        await sandbox.load_namespace(b"junk")
    assert await ok(sandbox, "print(area(2))") == "12.57\n"
    # The bridge still reaches the sandbox's llm_query after a load.
    sandbox.bridge = _echo_bridge
    try:
        assert await ok(sandbox, "print(llm_query('hi'))") == "echo:hi\n"
    finally:
        sandbox.bridge = None


async def _echo_bridge(call: LLMCall) -> list[LLMCallResult]:
    return [LLMCallResult(response=f"echo:{prompt}") for prompt in call.prompts]


async def test_a_dead_process_refuses_work(fresh: SandboxProcess) -> None:
    await fresh.kill()
    assert not fresh.alive
    with pytest.raises(SandboxCrashedError):
        await run(fresh, "1")
    with pytest.raises(SandboxCrashedError):
        await fresh.list_vars()


async def test_snapshot_is_made_once_per_pyodide_build(tmp_path: Path, anyio_backend: str) -> None:
    settings = WorkerSettings(cache_dir=tmp_path, grace_s=1.0)
    path = snapshot_path(settings)
    assert path.name.startswith(f"pyodide-{pyodide_version(settings)}-")
    assert not path.exists()
    # The cold start (no snapshot) runs while the snapshot is made: neither waits on the other.
    # It has a cache directory of its own, so the snapshot found at `path` is the first's.
    process, cold = await asyncio.gather(
        SandboxProcess.spawn(settings),
        SandboxProcess.spawn(WorkerSettings(cache_dir=tmp_path / "cold", use_snapshot=False)),
        return_exceptions=True,
    )
    try:
        if isinstance(process, BaseException):
            raise process
        if isinstance(cold, BaseException):
            raise cold
        assert path.exists()
        assert path.stat().st_size > 2**20
        assert await ok(process, "1 + 1") == "2\n"
        assert await ok(cold, "6 * 7") == "42\n"
    finally:
        for started in (process, cold):
            if isinstance(started, SandboxProcess):
                await started.kill()


def _left_behind(path: Path, age_s: float, content: bytes = b"old") -> Path:
    """A file as an earlier run left it: last used (and written) `age_s` ago."""
    path.write_bytes(content)
    at = time.time() - age_s
    os.utime(path, (at, at))
    return path


async def test_making_a_snapshot_prunes_what_older_ones_left(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Every upgrade or copy of the project makes a new ~30 MB snapshot: the cache directory
    keeps the most recently used ones and removes the rest when a new one is made."""
    settings = WorkerSettings(cache_dir=tmp_path, grace_s=1.0, snapshot_cache_keep=2)
    hour, day = 3600.0, 86400.0
    recent = _left_behind(tmp_path / "pyodide-0.1.0-aaaaaaaaaaaaaaaa.snapshot", hour)
    recent_lock = _left_behind(recent.with_suffix(".lock"), hour, b"")
    older = _left_behind(tmp_path / "pyodide-0.1.0-bbbbbbbbbbbbbbbb.snapshot", day)
    older_lock = _left_behind(older.with_suffix(".lock"), day, b"")
    oldest = _left_behind(tmp_path / "pyodide-0.0.9-cccccccccccccccc.snapshot", 7 * day)
    module_cache = _left_behind(recent.with_suffix(".deno-modules"), hour)
    abandoned = _left_behind(tmp_path / "pyodide-0.1.0-dddddddddddddddd.tmp4242", 2 * hour)
    abandoned_lock = _left_behind(abandoned.with_suffix(".lock"), 2 * hour, b"")
    being_written = _left_behind(tmp_path / "pyodide-0.1.0-eeeeeeeeeeeeeeee.tmp4243", 1.0)
    unrelated = _left_behind(tmp_path / "notes.txt", 7 * day)
    process = await SandboxProcess.spawn(settings)
    try:
        assert await ok(process, "1 + 1") == "2\n"
    finally:
        await process.kill()
    current = snapshot_path(settings)
    kept = {current, current.with_suffix(".lock"), recent, recent_lock, being_written, unrelated}
    assert _files(tmp_path) == kept
    gone = {older, older_lock, oldest, module_cache, abandoned, abandoned_lock}
    assert not _files(tmp_path) & gone


def _files(directory: Path) -> set[Path]:
    return {path for path in directory.iterdir() if path.is_file()}


async def test_a_snapshot_used_counts_as_recent(tmp_path: Path, anyio_backend: str) -> None:
    """Starting from a snapshot marks it used (its access time), and nothing else of it
    changes: its modification time keys the memory file `snapshot_memory` keeps of it."""
    settings = WorkerSettings(cache_dir=tmp_path)
    path = _left_behind(snapshot_path(settings), 3 * 86400.0)
    written = path.stat().st_mtime_ns
    assert await ensure_snapshot(settings) == path
    assert time.time() - path.stat().st_atime < 60
    assert path.stat().st_mtime_ns == written


def _fake_snapshot(marker: int) -> bytes:
    """A snapshot as Pyodide lays it out: a 128-byte header (its second u32: its length),
    then an image of four pages, the second all zero."""
    header = bytearray(128)
    header[0:8] = struct.pack("<II", 0x5AFE, 128)
    pages = [bytes([marker]) * PAGE, bytes(PAGE), bytes(range(256)) * 16, b"\x07" * PAGE]
    return bytes(header) + b"".join(pages)


def test_the_snapshot_memory_file_is_laid_out_for_mapping_and_sealed(tmp_path: Path) -> None:
    # Every sandbox maps this file: no process may change it, whatever its uid.
    snapshot = _fake_snapshot(1)
    path = _left_behind(tmp_path / "pyodide-0.1.0-aaaaaaaaaaaaaaaa.snapshot", 60.0, snapshot)
    fd = snapshot_memory(path)
    try:
        assert os.pread(fd, 128, 0) == snapshot[:128]
        assert os.pread(fd, 4 * PAGE, PAGE) == snapshot[128:]  # the image at a page boundary
        assert os.fstat(fd).st_blocks * 512 <= 4 * PAGE  # header and three pages: no zero page
        assert snapshot_bytes(fd) == snapshot
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", PAGE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        private = mmap.mmap(fd, PAGE, mmap.MAP_PRIVATE, offset=PAGE)  # copy-on-write: fine
        private[0] = 9
        assert os.pread(fd, 1, PAGE) == b"\x01"
        private.close()
    finally:
        os.close(fd)


def test_a_snapshot_pruned_after_it_was_found_is_still_served(tmp_path: Path) -> None:
    """Another supervisor may prune a snapshot between a start finding it and launching: the
    memory file kept for that name serves instead of failing the start; a new version of the
    file gets a new one."""
    path = _left_behind(tmp_path / "pyodide-0.1.0-aaaaaaaaaaaaaaaa.snapshot", 60.0)
    path.write_bytes(_fake_snapshot(1))
    first = snapshot_memory(path)
    path.unlink()
    kept = snapshot_memory(path)
    assert snapshot_bytes(kept) == _fake_snapshot(1)
    _left_behind(path, 30.0, _fake_snapshot(2))
    newer = snapshot_memory(path)
    assert snapshot_bytes(newer) == _fake_snapshot(2)
    for fd in (first, kept, newer):
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        snapshot_memory(tmp_path / "pyodide-0.1.0-bbbbbbbbbbbbbbbb.snapshot")


async def test_restore_refuses_bad_blobs(anyio_backend: str) -> None:
    with pytest.raises(SandboxBlobError):
        await SandboxProcess.restore(SETTINGS, b"junk")
    with pytest.raises(SandboxGuestError):
        await SandboxProcess.restore(SETTINGS, blob.pack(b"not a pickle", 6))


#: Python calls that Emscripten answered through Node, which Deno denies a sandbox (sys, env
#: and read permissions): each ended the sandbox with a fatal error, its session lost.
ONCE_FATAL = """
import os, socket
try:
    input()
except EOFError:
    eof = True
listener = socket.socket()
listener.bind(("127.0.0.1", 8080))
try:
    listener.listen()
except OSError as error:
    refused = error.errno > 0
print(os.getuid(), os.umask(0o22) >= 0, os.system("true"), eof, refused)
"""


async def test_calls_a_sandbox_cannot_serve_fail_in_python_and_the_session_lives(
    fresh: SandboxProcess,
) -> None:
    await ok(fresh, "kept = 41")
    assert await ok(fresh, ONCE_FATAL) == "0 True -1 True True\n"
    assert await ok(fresh, "print(kept + 1)") == "42\n"


def _v8_flags(pid: int) -> list[str]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    flags = next(arg for arg in argv if arg.startswith("--v8-flags="))
    return flags.removeprefix("--v8-flags=").split(",")


@pytest.mark.parametrize(
    ("optimize", "budget"), [(False, 0), (True, 13_000_000), (True, 50_000_000)]
)
async def test_the_wasm_compilers_settings_reach_v8(
    optimize: bool, budget: int, anyio_backend: str
) -> None:
    # RLM_SANDBOX_WASM_OPTIMIZING_COMPILER: whether V8 may recompile hot CPython
    # (WebAssembly) functions at all, off by default (memory); with it,
    # RLM_SANDBOX_WASM_TIERING_BUDGET says how soon (13,000,000 is V8's own).
    update = {"wasm_optimizing_compiler": optimize} | (
        {"wasm_tiering_budget": budget} if budget else {}
    )
    process = await SandboxProcess.spawn(SETTINGS.model_copy(update=update))
    try:
        flags = _v8_flags(process.pid)
        tiering = [
            f
            for f in flags
            if f.startswith(("--wasm-tiering-budget", "--liftoff-only", "--no-wasm-inlining"))
        ]
        assert tiering == (
            [f"--wasm-tiering-budget={budget}"]
            if optimize
            else ["--liftoff-only", "--no-wasm-inlining"]
        )
        assert any(flag.startswith("--wasm-max-mem-pages=") for flag in flags)
        process.bridge = RecordingBridge()
        assert await ok(process, "print(llm_query('hi'))") == "llm:hi\n"
    finally:
        await process.kill()


def _deno_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{sandbox_pid(pid)}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _deno_cache(pid: int) -> tuple[bool, bool, int]:
    """Whether Deno's cache is the sandbox's own tmpfs, whether V8's code cache is off, and
    the bytes that cache holds."""
    deno = sandbox_pid(pid)
    argv = Path(f"/proc/{deno}/cmdline").read_bytes().split(b"\0")
    own = _deno_environment(pid)["DENO_DIR"] == SANDBOX_DENO_DIR
    files = Path(f"/proc/{deno}/root{SANDBOX_DENO_DIR}").rglob("*") if own else []
    used = sum(f.lstat().st_blocks * 512 for f in files)  # (a symlink to deno is 0)
    return own, b"--no-code-cache" in argv, used


@pytest.mark.parametrize("tunables", ["", "glibc.malloc.arena_max=2"])
async def test_malloc_tunables_reach_the_deno_process(tunables: str, anyio_backend: str) -> None:
    # RLM_SANDBOX_MALLOC_TUNABLES: glibc's allocator in the sandbox, tuned to give memory back
    # (default) or left to its own defaults (empty).
    settings = SETTINGS.model_copy(update={"malloc_tunables": tunables})
    process = await SandboxProcess.spawn(settings)
    try:
        environment = _deno_environment(process.pid)
        assert environment.get("GLIBC_TUNABLES") == (tunables or None)
        process.bridge = RecordingBridge()
        assert await ok(process, "print(llm_query('hi'))") == "llm:hi\n"
    finally:
        await process.kill()


async def test_a_confined_sandbox_writes_no_code_cache_into_its_memory(anyio_backend: str) -> None:
    """Its Deno cache is its own tmpfs, empty at every start: V8's code cache written there
    (~3 MB of host memory per sandbox, outside its PSS) would never be read."""
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        process.bridge = RecordingBridge()
        assert await ok(process, "print(llm_query('hi'))") == "llm:hi\n"
        own_tmpfs, no_code_cache, used = _deno_cache(process.pid)
        # Unconfined, the cache is the host's, shared by every sandbox, and kept.
        assert no_code_cache is own_tmpfs
        assert used < 1 << 20, f"{used} bytes in the sandbox's Deno cache"
    finally:
        await process.kill()


def test_interrupt_files_left_by_a_dead_supervisor_are_removed(tmp_path: Path) -> None:
    """An interrupt file's name is removed once its sandbox opened it; a supervisor that died
    while a sandbox started left it in the temporary directory. The next supervisor's first
    sandbox removes those whose supervisor is gone, and no other."""
    dead_pid = _exited_pid()
    temp = Path(tempfile.gettempdir())
    left = temp / f"{INTERRUPT_FILE_PREFIX}{dead_pid}-test{os.getpid()}"
    live = temp / f"{INTERRUPT_FILE_PREFIX}1-test{os.getpid()}"  # pid 1 is alive
    foreign = temp / f"{INTERRUPT_FILE_PREFIX}notapid-test{os.getpid()}"
    for path in (left, live, foreign):
        path.write_bytes(bytes(4))
    try:
        assert sweep_left_interrupt_files.__wrapped__() >= 1
        assert not left.exists()
        assert live.exists() and foreign.exists()
        created = InterruptFile.create()
        try:
            assert created.path.name.startswith(f"{INTERRUPT_FILE_PREFIX}{os.getpid()}-")
        finally:
            created.close()
    finally:
        for path in (left, live, foreign):
            path.unlink(missing_ok=True)


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_malloc_tunables_are_only_tunable_names() -> None:
    assert "arena_max=1" in WorkerSettings().malloc_tunables
    with pytest.raises(ValueError, match="malloc_tunables"):
        WorkerSettings(malloc_tunables="glibc.malloc.arena_max=1 LD_PRELOAD=/tmp/x.so")


def test_wasm_tiering_budget_is_bounded() -> None:
    with pytest.raises(ValueError, match="wasm_tiering_budget"):
        WorkerSettings(wasm_tiering_budget=0)
    with pytest.raises(ValueError, match="wasm_tiering_budget"):
        WorkerSettings(wasm_tiering_budget=2**31)
