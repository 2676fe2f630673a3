"""Full llm_query round trips through the broker, against the floor and a 100 ms poller.

    .venv/bin/python bench/broker_roundtrip.py [--seconds 3] [--levels 1,16,64,256]

One run starts an embedded Redis and `rlm broker` (uvloop + httptools) as a child process,
then measures, with an instant-answer long-polling poller in this process:
  - round trips (enqueue -> pending -> respond -> enqueue returns) at each concurrency:
    p50, p99, round trips per second, and the broker's CPU time per round trip;
  - the floor: one bare HTTP request to the same server (`/health/live`) plus one Redis
    round trip, sequentially, as one client would see them;
  - a fixed-interval poller (checks `/pending?wait=0` every 100 ms, as the official RLM
    library's host does) at concurrency 1;
  - the same c=1 round trip and floor with the project's own client (`BrokerClient`, httpx2)
    on both sides, as the poller and runtime really talk to the broker;
and prints the ratios. Wall-clock figures vary run to run on a shared 2-core machine:
compare the ratios, which are taken in one run, and the CPU time per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import redis.asyncio as aioredis
import uvloop

from broker.redis_server import RedisServer, free_port
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import ServiceUnreachable
from rlm_wire.link import KeepAliveLink

ADMIN = "bench-admin-token"
HOST = "127.0.0.1"


class RawConnection:
    """One keep-alive connection speaking JSON, for load generation.

    The load must cost less than the server it measures: a general client (httpx2) spends
    ~0.5 ms of CPU per request on the same 2 cores as the broker; `KeepAliveLink` ~0.05 ms.
    Every measurement in a run uses it alike (floor, pollers, waiters), so ratios are fair.
    """

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self._link = KeepAliveLink(f"http://{host}:{port}", token, max_connections=1)

    async def request(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body).encode()
        status, raw = await self._link.request(method, target, payload, timeout_s=120)
        return status, json.loads(raw) if raw else None

    async def close(self) -> None:
        await self._link.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_loop(
    make_call: Callable[[], Callable[[], Awaitable[object]]], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """Run calls back to back from `concurrency` workers (each with its own connection)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        call = make_call()
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def poller(port: int, token: str, stop: asyncio.Event, interval_s: float | None) -> None:
    """Long-polls (interval_s None) or checks every interval_s; answers each batch at once."""
    connection = RawConnection(HOST, port, token)
    wait = 0.5 if interval_s is None else 0
    while not stop.is_set():
        _, body = await connection.request("GET", f"/pending?max=256&wait={wait}")
        requests = body["requests"]
        if requests:
            answers = [{"id": r["id"], "response": "ok"} for r in requests]
            await connection.request("POST", "/respond", {"responses": answers})
        if interval_s is not None:
            await asyncio.sleep(interval_s)
    await connection.close()


async def with_project_client(
    port: int, redis_url: str, tenant_token: str, session_token: str, seconds: float
) -> tuple[list[float], list[float]]:
    """Floor and c=1 round trips with BrokerClient (httpx2) as every real component uses it."""
    url = f"http://{HOST}:{port}"
    redis = aioredis.Redis.from_url(redis_url)
    async with httpx2.AsyncClient(base_url=url) as bare:

        def floor() -> Callable[[], Awaitable[object]]:
            async def call() -> None:
                (await bare.get("/health/live")).raise_for_status()
                await redis.ping()

            return call

        await timed_loop(floor, 1, 0.5)
        floor_lat, _ = await timed_loop(floor, 1, seconds)
    await redis.aclose()

    stop = asyncio.Event()
    tenant = BrokerClient(url, tenant_token)
    session = BrokerClient(url, session_token)

    async def answer() -> None:
        while not stop.is_set():
            batch = await tenant.pending(max_items=256, wait_s=0.5)
            if batch.requests:
                await tenant.respond_batch(
                    [p.Answer(id=r.id, response="ok") for r in batch.requests]
                )

    pollers = [asyncio.create_task(answer()) for _ in range(2)]
    request = p.LLMRequest(prompt="What is 2+2?")

    def round_trip() -> Callable[[], Awaitable[object]]:
        async def call() -> None:
            if (await session.enqueue(request, wait_s=30)).status != "done":
                raise RuntimeError("unexpected pending result")

        return call

    await timed_loop(round_trip, 1, 0.5)
    rt_lat, _ = await timed_loop(round_trip, 1, seconds)
    stop.set()
    await asyncio.gather(*pollers)
    await tenant.aclose()
    await session.aclose()
    return floor_lat, rt_lat


async def run(
    port: int, redis_url: str, broker_pid: int, levels: list[int], seconds: float
) -> None:
    admin = RawConnection(HOST, port, ADMIN)
    _, tenant = await admin.request("POST", "/tenants", {"name": "bench"})
    tenant_conn = RawConnection(HOST, port, tenant["token"])
    _, session = await tenant_conn.request("POST", "/sessions", {})
    await admin.close()
    await tenant_conn.close()

    def round_trip() -> Callable[[], Awaitable[object]]:
        connection = RawConnection(HOST, port, session["token"])

        async def call() -> None:
            status, body = await connection.request(
                "POST", "/enqueue?wait=30", {"prompt": "What is 2+2?"}
            )
            if status != 200 or body["status"] != "done":
                raise RuntimeError(f"unexpected answer {status} {body}")

        return call

    redis = aioredis.Redis.from_url(redis_url)

    def floor() -> Callable[[], Awaitable[object]]:
        connection = RawConnection(HOST, port, None)

        async def call() -> None:
            await connection.request("GET", "/health/live")
            await redis.ping()

        return call

    await timed_loop(floor, 1, 0.5)  # warm up
    floor_lat, _ = await timed_loop(floor, 1, seconds)
    await redis.aclose()

    stop = asyncio.Event()
    slow = asyncio.create_task(poller(port, tenant["token"], stop, 0.1))
    interval_lat, _ = await timed_loop(round_trip, 1, max(seconds, 2.0))
    stop.set()
    await slow

    # Two long-polling pollers, so that one always waits while the other answers.
    stop = asyncio.Event()
    pollers = [asyncio.create_task(poller(port, tenant["token"], stop, None)) for _ in range(2)]
    await timed_loop(round_trip, 4, 0.5)  # warm up
    rows = []
    for level in levels:
        cpu_before = cpu_seconds(broker_pid)
        lat, wall = await timed_loop(round_trip, level, seconds)
        cpu_per_rt = (cpu_seconds(broker_pid) - cpu_before) / len(lat)
        rows.append(
            (level, percentile(lat, 0.5), percentile(lat, 0.99), len(lat) / wall, cpu_per_rt)
        )
    stop.set()
    await asyncio.gather(*pollers)

    own_floor, own_rt = await with_project_client(
        port, redis_url, tenant["token"], session["token"], seconds
    )

    floor_p50 = statistics.median(floor_lat)
    interval_p50 = statistics.median(interval_lat)
    print(
        f"floor (bare HTTP + 1 Redis round trip): p50 {floor_p50 * 1000:.3f} ms "
        f"p99 {percentile(floor_lat, 0.99) * 1000:.3f} ms"
    )
    print(
        f"100 ms fixed-interval poller, c=1:      p50 {interval_p50 * 1000:.1f} ms "
        f"p99 {percentile(interval_lat, 0.99) * 1000:.1f} ms"
    )
    print()
    print(
        f"{'waiters':>8} {'p50 ms':>9} {'p99 ms':>9} {'round trips/s':>14} {'broker CPU ms/rt':>17}"
    )
    for level, p50, p99, rate, cpu in rows:
        print(f"{level:>8} {p50 * 1000:>9.3f} {p99 * 1000:>9.3f} {rate:>14.0f} {cpu * 1000:>17.3f}")
    c1_p50 = rows[0][1] if rows[0][0] == 1 else float("nan")
    print()
    print(f"p50 at c=1 / floor p50:          {c1_p50 / floor_p50:.2f}x  (target <= 3x)")
    print(f"100 ms poller p50 / p50 at c=1:  {interval_p50 / c1_p50:.1f}x  (target >= 20x)")
    for level, _, _, rate, _ in rows:
        if level == 64:
            print(f"round trips/s at 64 waiters:     {rate:.0f}  (target: thousands)")
    own_floor_p50, own_rt_p50 = statistics.median(own_floor), statistics.median(own_rt)
    print()
    print("with the project's client (BrokerClient / httpx2) on both sides, c=1:")
    print(
        f"  floor p50 {own_floor_p50 * 1000:.3f} ms, round trip p50 {own_rt_p50 * 1000:.3f} ms "
        f"p99 {percentile(own_rt, 0.99) * 1000:.3f} ms: {own_rt_p50 / own_floor_p50:.2f}x the floor"
    )
    print(f"load average while measuring:    {os.getloadavg()[0]:.2f} (2 cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--levels", default="1,16,64,256", help="concurrencies, comma-separated")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with RedisServer() as redis_server:
        port = free_port()
        env = {
            **os.environ,
            "RLM_REDIS_URL": redis_server.url,
            "RLM_ADMIN_TOKEN": ADMIN,
            "RLM_LOG_LEVEL": "WARNING",
        }
        rlm = Path(sys.executable).with_name("rlm")
        broker = subprocess.Popen(
            [str(rlm), "broker", "--host", HOST, "--port", str(port)], env=env
        )
        try:
            uvloop.run(_wait_ready(port))
            uvloop.run(run(port, redis_server.url, broker.pid, levels, args.seconds))
        finally:
            broker.terminate()
            broker.wait(timeout=10)


async def _wait_ready(port: int) -> None:
    for _ in range(400):
        try:
            connection = RawConnection(HOST, port, None)
            status, _ = await connection.request("GET", "/health/live")
            await connection.close()
            if status == 200:
                return
        except ServiceUnreachable:
            await asyncio.sleep(0.05)
    raise RuntimeError("the broker did not start")


if __name__ == "__main__":
    main()
