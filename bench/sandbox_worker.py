"""Measures the sandbox worker layer in one run: `python bench/sandbox_worker.py`.

Cold start, start from the memory snapshot, a trivial execute round trip, an llm_query round
trip through the pipe (the bridge answers at once), hibernate size and time, restore time
(into a new process, and into one already running), and PSS memory per live process.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sandbox_runtime.worker import LLMCall, LLMCallResult, SandboxProcess, WorkerSettings

ROUNDS = 200


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


async def instant_bridge(call: LLMCall) -> list[LLMCallResult]:
    return [LLMCallResult(response="ok") for _ in call.prompts]


def report(name: str, samples_s: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:<34} p50 {statistics.median(ms):9.3f} ms   p99 {p99:9.3f} ms   (n={len(ms)})")


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

        await sandbox.execute(
            "import json\nclass P:\n    def __init__(s, v):\n        s.v = v\n"
            "import random\n"
            "data = {'rows': [[random.random() for _ in range(50)] for _ in range(2000)]}\n"
            "objs = [P(i) for i in range(10000)]\ntext = 'lorem ipsum ' * 100000\n",
            timeout_s=30,
            output_bytes=4096,
        )
        for process in processes:
            await process.execute("1", timeout_s=10, output_bytes=4096)
        pss = [pss_bytes(p.pid) for p in processes]
        print(
            f"{'PSS per live process':<34} mean {statistics.mean(pss) / 2**20:8.1f} MiB "
            f"(n={len(pss)}, min {min(pss) / 2**20:.1f}, max {max(pss) / 2**20:.1f})"
        )

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
