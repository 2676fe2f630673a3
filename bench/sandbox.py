"""Measures the sandbox runtime in one run: `python bench/sandbox.py`.

Starts a real broker (`rlm broker`, embedded Redis) and a real runtime (`rlm sandbox`) as
child processes, and an instant poller in this process. Prints: cold start, start from the
memory snapshot, session create from the warm pool, a trivial execute over HTTP, llm_query
from Pyodide beside the exec script in a plain CPython subprocess and the local environment
(all through the same broker and poller), memory per live and per hibernated session,
hibernate and restore times, and how many sessions fit in this machine's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2

from broker.redis_server import RedisServer, free_port
from host_poller.environments import Environment, EnvironmentSpec, create_environment
from host_poller.settings import HostSettings
from rlm_wire import broker_models as bp
from rlm_wire import runtime_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.runtime_client import RuntimeClient
from sandbox_runtime.service.memory import process_pss
from sandbox_runtime.worker import SandboxProcess, WorkerSettings
from sandbox_runtime.worker.launcher import confinement_support

HOST = "127.0.0.1"
ADMIN = "bench-admin-token"
RUNTIME_TOKEN = "bench-runtime-token"
EXEC_SCRIPT = Path(__file__).resolve().parents[1] / "rlm_repl.py"
GIB = 2**30

# Code that times `n` sequential llm_query calls from inside the sandbox and prints the mean.
LLM_LOOP = (
    "import time\n"
    "llm_query('warm-up')\n"
    "_t = time.perf_counter()\n"
    "for _i in range({n}):\n"
    "    llm_query('hi')\n"
    "print((time.perf_counter() - _t) / {n})\n"
)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def line(name: str, samples: list[float], note: str = "") -> float:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    print(f"{name:<44} p50 {ms(p50)}  p90 {ms(p90)}  n={len(ordered):<4} {note}")
    return p50


# --- child processes --------------------------------------------------------------------------


@contextlib.contextmanager
def child(argv: list[str], env: dict[str, str]) -> Any:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_http(url: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx2.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.TransportError, ValueError):
                response = await http.get(f"{url}/health")
                if response.status_code < 500 and ok(response.json()):
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


@contextlib.asynccontextmanager
async def instant_poller(url: str, token: str) -> AsyncIterator[None]:
    stop = asyncio.Event()

    async def run() -> None:
        async with BrokerClient(url, token) as client:
            while not stop.is_set():
                batch = await client.pending(max_items=64, wait_s=0.5)
                if batch.requests:
                    await client.respond_batch(
                        [bp.Answer(id=r.id, response="ok") for r in batch.requests]
                    )

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        stop.set()
        await task


# --- measurements -----------------------------------------------------------------------------


async def worker_starts() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        cold_settings = WorkerSettings(cache_dir=Path(cache), use_snapshot=False)
        started = time.perf_counter()
        cold = await SandboxProcess.spawn(cold_settings)
        cold_s = time.perf_counter() - started
        await cold.kill()
    settings = WorkerSettings()
    await (await SandboxProcess.spawn(settings)).kill()  # the snapshot exists from here on
    warm: list[float] = []
    for _ in range(5):
        started = time.perf_counter()
        process = await SandboxProcess.spawn(settings)
        warm.append(time.perf_counter() - started)
        await process.kill()
    line("cold start (no snapshot), spawn -> ready", [cold_s])
    return cold_s, line("start from the memory snapshot", warm)


async def session_creates(runtime: RuntimeClient, url: str, pool: int, rounds: int) -> float:
    samples: list[float] = []
    for _ in range(rounds):
        await wait_http(url, lambda h: bool(h["pool"]["idle"] >= pool))
        started = time.perf_counter()
        created = await runtime.create_session(p.CreateSession())
        samples.append(time.perf_counter() - started)
        await runtime.delete_session(created.session_id)
    return line("session create from the warm pool (HTTP)", samples, "target p50 < 50 ms")


async def trivial_executes(runtime: RuntimeClient, url: str, pool: int, rounds: int) -> float:
    created = await runtime.create_session(p.CreateSession())
    await runtime.execute(created.session_id, "x = 0")
    await wait_http(url, lambda h: bool(h["pool"]["idle"] >= pool))  # refills are CPU-bound
    samples: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        await runtime.execute(created.session_id, "x = x + 1")
        samples.append(time.perf_counter() - started)
    await runtime.delete_session(created.session_id)
    return line("trivial execute (HTTP round trip)", samples, "target ~1 ms")


async def llm_query_pyodide(runtime: RuntimeClient, session_id: str, n: int) -> float:
    result = await runtime.execute(session_id, LLM_LOOP.format(n=n), timeout_s=300)
    if result.error is not None:
        raise RuntimeError(f"pyodide llm_query loop failed: {result.error}")
    return float(result.stdout.strip())


def llm_query_exec_script(broker_url: str, token: str, n: int) -> float:
    env = {"PATH": os.environ.get("PATH", ""), "RLM_BROKER_URL": broker_url}
    env["RLM_SESSION_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-I", str(EXEC_SCRIPT), "-c", LLM_LOOP.format(n=n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(done.stdout.strip())


async def llm_query_local(env: Environment, n: int) -> float:
    result = await env.execute(LLM_LOOP.format(n=n), timeout_s=300)
    if result.error is not None:
        raise RuntimeError(f"local llm_query loop failed: {result.error}")
    return float(result.stdout.strip())


async def llm_query_places(
    runtime: RuntimeClient,
    url: str,
    pool: int,
    broker_url: str,
    token: str,
    calls: int,
    rounds: int = 5,
) -> tuple[float, float, float]:
    """Mean seconds per llm_query in each place; the places alternate round by round, so a
    change of load on this shared machine falls on all three alike."""
    access = p.BrokerAccess(url=broker_url, token=token)
    session_id = (await runtime.create_session(p.CreateSession(broker=access))).session_id
    local = create_environment("local", HostSettings())
    await local.start(EnvironmentSpec(broker_url, token, 0, 1, p.Limits(), None))
    await wait_http(url, lambda h: bool(h["pool"]["idle"] >= pool))
    per_round = max(1, calls // rounds)
    pyodide, script, in_local = [], [], []
    try:
        for _ in range(rounds):
            pyodide.append(await llm_query_pyodide(runtime, session_id, per_round))
            script.append(
                await asyncio.to_thread(llm_query_exec_script, broker_url, token, per_round)
            )
            in_local.append(await llm_query_local(local, per_round))
    finally:
        await local.aclose()
        await runtime.delete_session(session_id)
    return statistics.median(pyodide), statistics.median(script), statistics.median(in_local)


async def memory_and_hibernation(
    runtime: RuntimeClient, url: str, pool: int, sessions: int
) -> tuple[float, float, float, float]:
    """PSS per live session, blob bytes per hibernated one, hibernate and restore p50."""
    ids = [(await runtime.create_session(p.CreateSession())).session_id for _ in range(sessions)]
    setup = "data = {i: str(i) * 10 for i in range(20000)}\ndef f(n): return n + 1\n"
    words = [f"w{(i * 7919) % 50021}" for i in range(200_000)]  # ~1.4 MB, not repetitive
    for session_id in ids:
        await runtime.load_context(session_id, " ".join(words))
        await runtime.execute(session_id, setup)
    headers = {"Authorization": f"Bearer {RUNTIME_TOKEN}"}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        pss = [process_pss((await http.get(f"/sessions/{i}")).json()["pid"]) or 0 for i in ids]
        hibernate: list[float] = []
        for session_id in ids:
            started = time.perf_counter()
            response = await http.post(f"/sessions/{session_id}/hibernate")
            hibernate.append(time.perf_counter() - started)
            assert response.json() == {"hibernated": True}
        health = (await http.get("/health")).json()
    blob_bytes = health["sessions"]["hibernated_bytes"] / max(1, health["sessions"]["hibernated"])
    restore: list[float] = []
    for session_id in ids:
        # A restore loads the blob into a sandbox from the warm pool; timed with the pool
        # refilled (as the session creates are), since refills are CPU-bound start-ups.
        await wait_http(url, lambda h: bool(h["pool"]["idle"] >= pool))
        started = time.perf_counter()
        result = await runtime.execute(session_id, "print(f(len(data)))")
        restore.append(time.perf_counter() - started)
        assert result.stdout == "20001\n", result
    for session_id in ids:
        await runtime.delete_session(session_id)
    live = statistics.median(pss)
    print(f"{'memory per live session (PSS)':<44} p50 {live / 2**20:9.1f} MiB  n={len(pss)}")
    print(
        f"{'memory per hibernated session (blob)':<44} mean {blob_bytes / 2**20:8.2f} MiB  "
        "target < 10 MB (1.4 MB context, 20,000-entry dict, a function)"
    )
    hib = line("hibernate (snapshot, process exits)", hibernate)
    res = line("restore (warm pool) + execute on the next call", restore, "target < 0.5 s")
    return live, blob_bytes, hib, res


async def run(args: argparse.Namespace, broker_url: str, runtime_url: str) -> None:
    async with BrokerClient(broker_url, ADMIN) as admin:
        tenant = await admin.create_tenant("bench")
    async with BrokerClient(broker_url, tenant.token) as tenant_client:
        session = await tenant_client.create_session(metadata={"depth": 0, "max_depth": 1})

    confined = confinement_support(WorkerSettings())
    print(
        f"sandbox runtime benchmark  ({os.cpu_count()} cores, pool of {args.pool}, "
        f"confinement {confined.mode}{', own uid' if confined.own_uid else ''})"
    )
    await worker_starts()
    async with RuntimeClient(runtime_url, RUNTIME_TOKEN) as runtime:
        await session_creates(runtime, runtime_url, args.pool, args.creates)
        if args.quick:
            print(f"load average while measuring: {os.getloadavg()[0]:.2f}")
            return
        trivial = await trivial_executes(runtime, runtime_url, args.pool, args.executes)
        async with instant_poller(broker_url, tenant.token):
            in_pyodide, in_script, in_local = await llm_query_places(
                runtime, runtime_url, args.pool, broker_url, session.token, args.calls
            )
        live, hibernated, _, _ = await memory_and_hibernation(
            runtime, runtime_url, args.pool, args.sessions
        )

    print(f"{'llm_query from Pyodide (instant poller)':<44} mean {ms(in_pyodide)}  (5 rounds)")
    print(f"{'llm_query from the exec script (CPython)':<44} mean {ms(in_script)}")
    print(f"{'llm_query from the local environment':<44} mean {ms(in_local)}")
    print(f"{'  Pyodide / exec script':<44} {in_pyodide / in_script:9.2f}x  (target <= 1.5x)")
    print(f"{'  Pyodide / local':<44} {in_pyodide / in_local:9.2f}x")
    print(f"{'trivial execute / llm_query from Pyodide':<44} {trivial / in_pyodide:9.2f}x")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = total - 2 * GIB  # the OS, Redis, broker and the runtime itself
    print(
        f"in {total / GIB:.1f} GiB (2 GiB kept for the rest): ~{budget / live:.0f} live "
        f"sessions, or ~{budget / hibernated:,.0f} hibernated ones (blobs in memory)"
    )
    print(f"load average while measuring: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pool", type=int, default=4, help="warm pool size of the runtime")
    parser.add_argument("--creates", type=int, default=20, help="session creates timed")
    parser.add_argument("--executes", type=int, default=300, help="trivial executes timed")
    parser.add_argument("--calls", type=int, default=300, help="llm_query calls per place")
    parser.add_argument("--sessions", type=int, default=6, help="sessions for memory figures")
    parser.add_argument("--quick", action="store_true", help="start-ups and session creates only")
    args = parser.parse_args()
    rlm = str(Path(sys.executable).with_name("rlm"))
    base_env = {**os.environ, "RLM_LOG_LEVEL": "WARNING"}
    with RedisServer() as redis_server:
        broker_port, runtime_port = free_port(), free_port()
        broker_env = {**base_env, "RLM_REDIS_URL": redis_server.url, "RLM_ADMIN_TOKEN": ADMIN}
        runtime_env = {
            **base_env,
            "RLM_SANDBOX_TOKEN": RUNTIME_TOKEN,
            "RLM_SANDBOX_POOL_SIZE": str(args.pool),
            "RLM_SANDBOX_HIBERNATE_AFTER_S": "0",
            "RLM_SANDBOX_MAX_LIVE_SESSIONS": "64",
        }
        broker_argv = [rlm, "broker", "--host", HOST, "--port", str(broker_port)]
        runtime_argv = [rlm, "sandbox", "--host", HOST, "--port", str(runtime_port)]
        with child(broker_argv, broker_env), child(runtime_argv, runtime_env):
            broker_url, runtime_url = (
                f"http://{HOST}:{broker_port}",
                f"http://{HOST}:{runtime_port}",
            )

            async def go() -> None:
                await wait_http(broker_url, lambda h: True)
                await wait_http(runtime_url, lambda h: bool(h["pool"]["idle"] >= args.pool))
                await run(args, broker_url, runtime_url)

            asyncio.run(go())


if __name__ == "__main__":
    main()
