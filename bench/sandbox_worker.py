"""Measures the sandbox worker layer in one run: `python bench/sandbox_worker.py`.

Cold start, start from the memory snapshot, a trivial execute round trip, an llm_query round
trip through the pipe (the bridge answers at once), hibernate size and time, restore time
(into a new process, and into one already running), and the memory of each live process:
PSS (and its private / shared parts) from /proc/<pid>/smaps_rollup, once idle and once
*loaded*: after every session ran code that imports modules and holds data (what a live
session of an RLM run looks like), each process measured on its own, not a mean over idle
ones. Every figure is printed with /proc/loadavg.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sandbox_runtime.service.memory import rollup_kib
from sandbox_runtime.worker import LLMCall, LLMCallResult, SandboxProcess, WorkerSettings

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


async def instant_bridge(call: LLMCall) -> list[LLMCallResult]:
    return [LLMCallResult(response="ok") for _ in call.prompts]


def report(name: str, samples_s: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{name:<34} p50 {statistics.median(ms):9.3f} ms   p99 {p99:9.3f} ms   (n={len(ms)}, "
        f"load {loadavg()})"
    )


async def main() -> None:
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


if __name__ == "__main__":
    asyncio.run(main())
