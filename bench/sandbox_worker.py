"""Measures the sandbox worker layer in one run: `python bench/sandbox_worker.py`.

Cold start, start from the memory snapshot, a trivial execute round trip, an llm_query round
trip through the pipe (the bridge answers at once), hibernate size and time, restore time
(into a new process, and into one already running), and the memory of each live process:
PSS (and its private / shared parts) from /proc/<pid>/smaps_rollup, once idle and once
*loaded*: after every session ran code that imports modules and holds data (what a live
session of an RLM run looks like), each process measured on its own, not a mean over idle
ones, and what the median one holds, part by part (`anatomy_kib`), beside a bare Deno
process. Then the same loaded sessions with RLM_SANDBOX_MERGE_PAGES (kernel same-page merging)
beside as many without it, in the same minutes, and what the kernel's ksmd spent merging
(`--no-merge-pages` skips it; it needs root to start ksmd when it is not running, and puts
ksmd's settings back after). Every figure is printed with /proc/loadavg.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sandbox_runtime.service.memory import rollup_kib, smaps_regions, snapshot_file_kib
from sandbox_runtime.worker import LLMCall, LLMCallResult, SandboxProcess, WorkerSettings
from sandbox_runtime.worker.page_merging import KSM_DIR
from sandbox_runtime.worker.page_merging import status as page_merging_status
from sandbox_runtime.worker.snapshot_memory import MAPPED_NAME_PREFIX

ROUNDS = 200


#: What a loaded session runs: imports (json, re, collections, random, statistics), a 1.4 MB
#: context, a 20,000-entry dict, 2,000 x 50 floats and 10,000 small objects.
LOAD_SESSION = """
import collections, json, random, re, statistics
context = 'lorem ipsum dolor sit amet ' * 52000
index = {f'key{i}': [i, str(i)] for i in range(20000)}
rows = [[random.random() for _ in range(50)] for _ in range(2000)]
class Item:
    def __init__(self, v):
        self.v = v
objs = [Item(i) for i in range(10000)]
words = collections.Counter(re.findall(r'[a-z]+', context[:200000]))
summary = json.dumps({'n': len(index), 'mean': statistics.mean(r[0] for r in rows)})
"""


def memory_kib(pid: int) -> dict[str, int]:
    """smaps_rollup fields of one live process, in KiB (Pss, Pss_Anon, Private_*, Shared_*),
    read as the runtime reads them (`sandbox_runtime.service.memory`)."""
    fields = rollup_kib(pid)
    if not fields:
        raise ProcessLookupError(f"process {pid} is gone")
    return fields


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report_memory(label: str, pids: list[int]) -> None:
    print(f"{label} (load {loadavg()}):")
    for pid in pids:
        m = memory_kib(pid)
        private = m["Private_Clean"] + m["Private_Dirty"]
        shared = m["Shared_Clean"] + m["Shared_Dirty"]
        print(
            f"  pid {pid:>7}: PSS {m['Pss'] / 1024:7.1f} MiB  (anon {m['Pss_Anon'] / 1024:6.1f}, "
            f"file {m['Pss_File'] / 1024:5.1f})  private {private / 1024:7.1f} MiB  "
            f"shared {shared / 1024:6.1f} MiB  RSS {m['Rss'] / 1024:7.1f} MiB"
        )
    pss = [memory_kib(pid)["Pss"] / 1024 for pid in pids]
    print(
        f"  PSS per process: median {statistics.median(pss):.1f} MiB, "
        f"min {min(pss):.1f}, max {max(pss):.1f} (n={len(pss)})"
    )


#: Run inside a session after its PSS was read: what its Python heap holds (Pyodide's CPython is
#: built without pymalloc, so every object is a block of Emscripten's dlmalloc, which
#: `mallinfo` sums up) and V8's heap, which the guest sees as `js.Deno.memoryUsage()`.
HEAPS_PROBE = """
import ctypes as _ctypes, js as _js
class _MallInfo(_ctypes.Structure):
    _fields_ = [(_n, _ctypes.c_int) for _n in ('arena ordblks smblks hblks hblkhd usmblks '
                                              'fsmblks uordblks fordblks keepcost').split()]
_mallinfo = _ctypes.CDLL(None).mallinfo
_mallinfo.restype = _MallInfo
_heap, _v8 = _mallinfo(), _js.Deno.memoryUsage()
print(_heap.uordblks, _heap.fordblks, _v8.heapUsed, _v8.heapTotal)
"""


def _unique_chunk(data: bytes, at: float) -> bytes:
    """64 bytes of `data` from about fraction `at` on that occur nowhere else in it."""
    for start in range(int(len(data) * at), len(data) - 64, 64):
        chunk = data[start : start + 64]
        if data.count(chunk) == 1:
            return chunk
    raise ValueError(f"no unique 64-byte chunk past {at:.0%}")


def _before_data_section(binary: bytes) -> int:
    """How many bytes of a WebAssembly binary come before its data section (id 11): what V8's
    copy of Pyodide's binary holds once its segments are emptied."""
    at = 8  # past the magic number and the version
    while at < len(binary) and binary[at] != 11:
        size, shift, at = 0, 0, at + 1
        while True:  # the section's size, unsigned LEB128
            byte = binary[at]
            at += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        at += size
    return at


def anatomy_kib(pid: int, pyodide_dir: Path) -> dict[str, int]:
    """PSS of one sandbox process by part, in KiB, from /proc/<pid>/smaps. Its anonymous
    read-write regions are told apart by what they hold (read through /proc/<pid>/mem): V8's
    copy of the binary holds its code section; the WebAssembly memory holds the binary's data
    segments (V8's copy has them emptied: sandbox_runtime/js/pyodide_load.mjs). The kernel
    merges neighbouring anonymous mappings into one region: of the one holding V8's copy,
    only the copy's size is counted as the copy. A mapped snapshot (its memory file) and the
    read-write region right after it (what the memory grew by) are the WebAssembly memory."""
    binary = (pyodide_dir / "pyodide.asm.wasm").read_bytes()
    code, data = _unique_chunk(binary, 0.2), _unique_chunk(binary, 0.9)
    copy_kib = _before_data_section(binary) // 1024
    other = "V8's heap, other anonymous memory"
    parts: dict[str, int] = {}
    memory_end = -1  # where the mapped snapshot ends: the memory's grown part follows it
    for start, end, perms, path, pss, _ in smaps_regions(pid):
        grown = start == memory_end and not path and perms.startswith("rw")
        if path.startswith(MAPPED_NAME_PREFIX) or grown:
            part = "the WebAssembly memory"  # the snapshot's image, mapped copy-on-write
            memory_end = end
        elif path.endswith("/deno"):
            part = "the Deno binary, its own data" if "w" in perms else "the Deno binary, shared"
        elif path == "[heap]":
            part = "the malloc heap"
        elif path:
            part = "other files, stacks"
        elif "x" in perms:
            part = "compiled WebAssembly code"
        else:
            part = other
            held = _read_memory(pid, start, end) if perms.startswith("rw") and pss >= 1024 else b""
            if code in held:
                parts["V8's copy of the binary"] = min(pss, copy_kib)
                pss -= min(pss, copy_kib)
            elif data in held:
                part = "the WebAssembly memory"
        parts[part] = parts.get(part, 0) + pss
    return parts


def _read_memory(pid: int, start: int, end: int) -> bytes:
    """Bytes start..end of process `pid`'s memory; empty when they cannot be read (another
    uid's sandbox without root, or a region that went away)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/mem", "rb", 0) as memory:
        memory.seek(start)
        return memory.read(end - start)
    return b""


async def report_anatomy(process: SandboxProcess, settings: WorkerSettings) -> None:
    """What one loaded session's process holds, and beside it a bare Deno process (the
    runtime's own floor), started in the same minutes."""
    parts = anatomy_kib(process.pid, settings.pyodide_dir)
    total = sum(parts.values())
    print(f"anatomy of one loaded process (PSS {total / 1024:.1f} MiB, load {loadavg()}):")
    for part, kib in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {part:<38} {kib / 1024:6.1f} MiB")
    probe = await process.execute(HEAPS_PROBE, timeout_s=30, output_bytes=4096)
    if probe.error is None:
        allocated, free, v8_used, v8_total = (int(n) for n in probe.stdout.split())
        print(
            f"  inside: Python's heap {allocated / 2**20:.1f} MiB allocated, {free / 2**20:.1f} "
            f"MiB free in its allocator; V8's heap {v8_used / 2**20:.1f} MiB used of "
            f"{v8_total / 2**20:.1f} MiB"
        )
    else:
        print(f"  inside: not read ({probe.error})")
    bare = await asyncio.create_subprocess_exec(
        str(settings.deno_path),
        "run",
        "data:text/javascript,Deno.stdin.readSync(new Uint8Array(1))",
        stdin=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(2)  # started and blocked on its input
    print(
        f"a bare Deno process beside them (blocked on its input): PSS "
        f"{memory_kib(bare.pid)['Pss'] / 1024:.1f} MiB (load {loadavg()})"
    )
    bare.kill()
    await bare.wait()


async def instant_bridge(call: LLMCall) -> list[LLMCallResult]:
    return [LLMCallResult(response="ok") for _ in call.prompts]


def report(name: str, samples_s: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{name:<34} p50 {statistics.median(ms):9.3f} ms   p99 {p99:9.3f} ms   (n={len(ms)}, "
        f"load {loadavg()})"
    )


def _ksm(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def _ksmd_cpu_s() -> float:
    """CPU seconds the kernel's ksmd thread has used so far (0 when there is none)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ksmd":
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@contextlib.contextmanager
def _ksmd_started() -> Iterator[str]:
    """ksmd running for the measurement: as the machine has it, or started at the pace the
    machine has set (the kernel's default: 100 pages every 20 ms) and stopped again after."""
    pace = f"{_ksm('pages_to_scan')} pages every {_ksm('sleep_millisecs')} ms"
    if page_merging_status(True).active:
        yield f"already running ({pace})"
        return
    (KSM_DIR / "run").write_text("1")
    try:
        yield f"started for the bench ({pace}), stopped after"
    finally:
        (KSM_DIR / "run").write_text("0")


async def _merging_settled() -> int:
    """Wait until ksmd went over all memory that opted in at least three times (a page is
    merged at the earliest in the scan after the one that first saw it) and the last full
    scan merged nothing more; the number of full scans waited for."""
    start = last = _ksm("full_scans")
    sharing = _ksm("pages_sharing")
    while True:
        await asyncio.sleep(0.5)
        scans = _ksm("full_scans")
        if scans == last:
            continue
        last, before, sharing = scans, sharing, _ksm("pages_sharing")
        if scans - start >= 3 and sharing <= before:
            return scans - start


async def merged_memory(settings: WorkerSettings, sessions: int) -> None:
    """PSS of `sessions` loaded sessions with RLM_SANDBOX_MERGE_PAGES and as many without, in
    the same minutes, once ksmd's merging has settled."""
    merging = page_merging_status(True)
    if not merging.supported:
        print(f"page merging: not measured ({merging.detail})")
        return
    with contextlib.ExitStack() as stack:
        try:
            how = stack.enter_context(_ksmd_started())
        except OSError as exc:
            print(f"page merging: not measured (cannot start ksmd: {exc})")
            return
        groups: dict[str, list[SandboxProcess]] = {"without merging": [], "merging": []}
        for _ in range(sessions):  # alternately, so both groups start under the same load
            for label, merge in (("without merging", False), ("merging", True)):
                worker = settings.model_copy(update={"merge_pages": merge})
                process = await SandboxProcess.spawn(worker)
                await process.execute(LOAD_SESSION, timeout_s=60, output_bytes=4096)
                await process.execute("1", timeout_s=10, output_bytes=4096)
                groups[label].append(process)
        cpu_before, settle_started = _ksmd_cpu_s(), time.perf_counter()
        scans = await _merging_settled()
        print(
            f"page merging: ksmd {how}; settled after {scans} full scans, "
            f"{time.perf_counter() - settle_started:.1f} s and "
            f"{_ksmd_cpu_s() - cpu_before:.2f} s of ksmd CPU"
        )
        medians = {}
        for label, processes in groups.items():
            pids = [p.pid for p in processes]
            report_memory(f"memory of each of {sessions} loaded live processes, {label}", pids)
            medians[label] = statistics.median(memory_kib(pid)["Pss"] for pid in pids)
        ratio = medians["merging"] / medians["without merging"]
        print(f"loaded session PSS, merging / without: {ratio:.2f}x (load {loadavg()})")
        # What the merged pages cost when written again (a copy-on-write fault each): a
        # cell that rewrites the session's data, in every session, alternating the groups.
        rewrite = "index = {k: v[::-1] for k, v in index.items()}; rows.sort()"
        timings: dict[str, list[float]] = {label: [] for label in groups}
        for pair in zip(*groups.values(), strict=True):
            for label, process in zip(groups, pair, strict=True):
                started = time.perf_counter()
                await process.execute(rewrite, timeout_s=60, output_bytes=4096)
                timings[label].append(time.perf_counter() - started)
        for label, samples in timings.items():
            report(f"rewrite cell, {label}", samples)
        for processes in groups.values():
            for process in processes:
                await process.kill()


async def main(merge_pages: bool) -> None:
    with tempfile.TemporaryDirectory() as cache:
        cold_settings = WorkerSettings(cache_dir=Path(cache), use_snapshot=False)
        started = time.perf_counter()
        cold = await SandboxProcess.spawn(cold_settings)
        report("cold start (spawn -> ready)", [time.perf_counter() - started])
        await cold.kill()

        settings = WorkerSettings(cache_dir=Path(cache))
        started = time.perf_counter()
        first = await SandboxProcess.spawn(settings)
        report("first start (makes the snapshot)", [time.perf_counter() - started])
        warm: list[float] = []
        processes = [first]
        for _ in range(5):
            started = time.perf_counter()
            processes.append(await SandboxProcess.spawn(settings))
            warm.append(time.perf_counter() - started)
        report("start from snapshot", warm)

        sandbox = processes[-1]
        await sandbox.execute("x = 1", timeout_s=10, output_bytes=4096)
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            await sandbox.execute("x = x + 1", timeout_s=10, output_bytes=4096)
            samples.append(time.perf_counter() - started)
        report("trivial execute round trip", samples)

        sandbox.bridge = instant_bridge
        await sandbox.execute(
            "def call_many(n):\n    for _ in range(n):\n        llm_query('hi')",
            timeout_s=10,
            output_bytes=4096,
        )
        started = time.perf_counter()
        await sandbox.execute(f"call_many({ROUNDS * 5})", timeout_s=60, output_bytes=4096)
        per_call = (time.perf_counter() - started) / (ROUNDS * 5)
        print(f"{'llm_query round trip (in a loop)':<34} mean {per_call * 1e6:8.1f} us")
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            await sandbox.execute("llm_query('hi')", timeout_s=10, output_bytes=4096)
            samples.append(time.perf_counter() - started)
        report("execute with one llm_query", samples)

        # Deno itself, not bwrap. Idle: started from the snapshot, one trivial execute.
        idle = await SandboxProcess.spawn(settings)
        await idle.execute("1", timeout_s=10, output_bytes=4096)
        report_memory("memory of an idle live process", [idle.pid])
        await idle.kill()
        for process in processes:
            await process.execute(LOAD_SESSION, timeout_s=60, output_bytes=4096)
            await process.execute("1", timeout_s=10, output_bytes=4096)
        report_memory("memory of each loaded live process", [p.pid for p in processes])
        held, mapped = snapshot_file_kib([os.getpid(), *(p.pid for p in processes)])
        print(
            f"the snapshot's memory file, held once by this runtime: {held / 1024:.1f} MiB, "
            f"{mapped / 1024:.1f} of it in the PSS above; the rest, "
            f"{(held - mapped) / 1024:.1f} MiB, is {(held - mapped) / 1024 / len(processes):.1f}"
            f" MiB per loaded process"
        )
        # Not the last one: it is hibernated next, and the anatomy's probe runs code in it.
        by_pss = sorted(processes[:-1], key=lambda p: memory_kib(p.pid)["Pss"])
        await report_anatomy(by_pss[len(by_pss) // 2], settings)

        started = time.perf_counter()
        blob = await sandbox.hibernate()
        report("hibernate (snapshot + exit)", [time.perf_counter() - started])
        print(f"{'hibernated blob size':<34} {len(blob) / 2**20:8.2f} MiB")
        restores = []
        for _ in range(5):
            started = time.perf_counter()
            restored = await SandboxProcess.restore(settings, blob)
            restores.append(time.perf_counter() - started)
            await restored.kill()
        report("restore (spawn + load namespace)", restores)
        loads = []
        for process in processes[:-1]:  # already running, like the runtime's warm pool
            started = time.perf_counter()
            await process.load_namespace(blob)
            loads.append(time.perf_counter() - started)
        report("load namespace into a running one", loads)
        for process in processes:
            await process.kill()
        if merge_pages:
            await merged_memory(settings, len(processes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-merge-pages",
        action="store_true",
        help="skip the measurement with RLM_SANDBOX_MERGE_PAGES",
    )
    asyncio.run(main(merge_pages=not parser.parse_args().no_merge_pages))
