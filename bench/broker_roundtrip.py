"""llm_query round trips through the broker with the project's own poller, against the floor,
a minimal poller (the ceiling) and the official RLM library's broker pattern, in one run.

    .venv/bin/python bench/broker_roundtrip.py [--seconds 3] [--levels 1,16,64]
        [--rlms-python PATH]   # an interpreter with `rlms` + Flask (uv sync --group bench)

One run starts an embedded Redis and `rlm broker` (uvloop + httptools) as child processes and
measures, for each concurrency (waiters each doing enqueue -> answer -> enqueue returns):
  - product: the project's `Poller` (host_poller.poller) in its own process, as `rlm poller`
    runs it (uvloop, default settings, RLM_POLLER_HTTP_TRANSPORT=link), with an instant
    in-process LLM client; and the same poller on httpx2 (`=httpx`) and on the stdlib
    asyncio loop, to show what the lean transport and uvloop pay;
  - ceiling: a minimal long-polling poller written in this file (two of them, in the load
    generator's process): what the broker alone allows;
  - baseline: the official RLM library (PyPI `rlms`): its broker script and its poller with
    its LM handler, unmodified, as plain local processes (bench/rlms_baseline.py);
  - openai: `rlm poller` itself (its own process, default settings) calling an instant
    OpenAI-compatible server in its own process (`rlm fake-llm`, one rule answering "ok",
    no delay) through the openai SDK, as the product does (host_poller.llm), for a priced
    model (`--openai-model`, default gpt-4o-mini: its cost is counted as a deployment's);
    `--before-tree DIR` (a copy of an older tree, e.g. `git archive HEAD`) runs its poller
    too, in alternating rounds (`--rounds`), and prints the medians of both;
  - floor: one bare HTTP request to the broker (`/health/live`) + one Redis PING, serially;
  - raw floor: the same over plain sockets (asyncio streams, no client library): the floor
    of issue 13's openai target.
For each: p50, p99, round trips/s, CPU per round trip of the broker, Redis, the poller and
the LLM server (openai setups)
(utime + stime of each process from /proc/<pid>/stat), with /proc/loadavg at that moment,
and the Redis commands per round trip (`INFO commandstats` before and after, over the round
trips: scripts, PUBLISH, ...). `--setups` picks some of the setups (e.g. `floor,product`).
Ratios are taken within the run: compare ratios across runs, not absolute times.
The load generator uses `rlm_wire.KeepAliveLink` for every setup alike (httpx2 would spend
~0.5 ms of client CPU per request on the same 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

from broker.redis_server import RedisServer, free_port
from host_poller.llm.types import Completion, Message, Usage
from host_poller.poller import ModelRouter, Poller, PollerSettings, RequestHandler
from rlm_wire.errors import ServiceUnreachable
from rlm_wire.link import KeepAliveLink

ADMIN = "bench-admin-token"
HOST = "127.0.0.1"
PROMPT = "What is 2+2?"
BENCH = Path(__file__).resolve().parent
#: What `--setups` may pick: the floor, the minimal poller, the shipped poller, the shipped
#: poller on httpx2 and on the stdlib loop, the official library.
SETUPS = ("floor", "raw-floor", "ceiling", "product", "httpx", "asyncio", "openai", "rlms")
#: The scripted LLM of the `openai` setup: "ok" to any conversation, at once.
INSTANT_SCENARIO = {
    "name": "instant",
    "rules": [{"name": "ok", "reply": {"kind": "text", "text": "ok"}}],
}
OPENAI = "openai (rlm poller + SDK)"
OPENAI_BEFORE = "openai, before tree"
RAW_FLOOR = "raw floor (socket + PING)"

Call = Callable[[], Awaitable[object]]


class RawConnection:
    """One keep-alive connection speaking JSON, for load generation."""

    def __init__(self, port: int, token: str | None) -> None:
        self._link = KeepAliveLink(f"http://{HOST}:{port}", token, max_connections=1)

    async def request(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body).encode()
        reply = await self._link.request(method, target, payload, timeout_s=120)
        return reply.status, json.loads(reply.body) if reply.body else None

    async def close(self) -> None:
        await self._link.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Row:
    setup: str
    level: int
    p50: float
    p99: float
    rate: float
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per round trip, by process role."""
    load: str = ""
    commands: dict[str, float] = field(default_factory=dict)
    """Redis commands per round trip, by command (our broker's Redis only)."""


async def command_counts(redis: aioredis.Redis | None) -> dict[str, int]:
    """`INFO commandstats` as {command: calls}; empty when there is no Redis to ask."""
    if redis is None:
        return {}
    stats = await redis.info("commandstats")
    return {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()}


async def timed_loop(
    make_call: Callable[[], Call], concurrency: int, seconds: float
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


async def measure(
    setup: str,
    make_call: Callable[[], Call],
    levels: Sequence[int],
    seconds: float,
    pids: Mapping[str, int],
    redis: aioredis.Redis | None = None,
) -> list[Row]:
    await timed_loop(make_call, min(levels), 0.5)  # warm up (and wait for the poller)
    rows = []
    for level in levels:
        calls_before = await command_counts(redis)
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        lat, wall = await timed_loop(make_call, level, seconds)
        cpu = {role: (cpu_seconds(pid) - before[role]) / len(lat) for role, pid in pids.items()}
        calls_after = await command_counts(redis)
        # The two INFO calls are the bench's own; every other command is the round trips'.
        calls_after["info"] = calls_after.get("info", 0) - 1
        commands = {
            name: (count - calls_before.get(name, 0)) / len(lat)
            for name, count in calls_after.items()
            if count > calls_before.get(name, 0)
        }
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        rows.append(Row(setup, level, p50, p99, len(lat) / wall, cpu, loadavg(), commands))
    return rows


# --- the setups --------------------------------------------------------------------------


class RawFloor:
    """One bare `GET /health/live` and one Redis PING on plain sockets: no client library."""

    def __init__(self, port: int, redis_port: int) -> None:
        self._ports = (port, redis_port)
        self._http: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._redis: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self) -> None:
        if self._http is None or self._redis is None:
            self._http = await asyncio.open_connection(HOST, self._ports[0])
            self._redis = await asyncio.open_connection(HOST, self._ports[1])
        reader, writer = self._http
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer {head!r}")
        reader, writer = self._redis
        writer.write(b"PING\r\n")
        if await reader.readline() != b"+PONG\r\n":
            raise RuntimeError("Redis did not answer PONG")

    async def close(self) -> None:
        for pair in (self._http, self._redis):
            if pair is not None:
                pair[1].close()


def our_round_trip(port: int, session_token: str) -> Callable[[], Call]:
    def make() -> Call:
        connection = RawConnection(port, session_token)

        async def call() -> None:
            status, body = await connection.request("POST", "/enqueue?wait=30", {"prompt": PROMPT})
            if status != 200 or body["status"] != "done":
                raise RuntimeError(f"unexpected answer {status} {body}")

        return call

    return make


async def minimal_poller(port: int, token: str, stop: asyncio.Event) -> None:
    """The ceiling: long-polls, answers each batch at once, parses nothing it can skip."""
    connection = RawConnection(port, token)
    while not stop.is_set():
        _, body = await connection.request("GET", "/pending?max=256&wait=0.5")
        if requests := body["requests"]:
            answers = [{"id": r["id"], "response": "ok"} for r in requests]
            await connection.request("POST", "/respond", {"responses": answers})
    await connection.close()


class InstantLLM:
    """An `LLMClient` that answers at once: the bench measures the plumbing."""

    model = "instant"

    async def complete(
        self, messages: Sequence[Message], *, params: Mapping[str, Any] | None = None
    ) -> Completion:
        return Completion(text="ok", model=self.model, usage=Usage(), latency_s=0.0, attempts=1)

    async def aclose(self) -> None:
        return None


async def serve_poller() -> None:
    """The child process: the project's `Poller`, configured from RLM_* like `rlm poller`."""

    def no_profile(profile: Any) -> InstantLLM:
        raise RuntimeError("only the instant client is configured")

    router = ModelRouter({}, "instant", no_profile, clients={"instant": InstantLLM()})
    poller = Poller(PollerSettings(), RequestHandler(router))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, poller.request_stop)
    await poller.run()


def spawn_poller(port: int, token: str, transport: str, loop: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RLM_BROKER_URL": f"http://{HOST}:{port}",
        "RLM_TENANT_TOKEN": token,
        "RLM_POLLER_HTTP_TRANSPORT": transport,
    }
    return subprocess.Popen([sys.executable, __file__, "--serve-poller", loop], env=env)


def spawn_fake_llm(port: int, scenario: Path) -> subprocess.Popen[bytes]:
    """`rlm fake-llm` in its own process (uvloop, as the command runs it); its uvicorn logs
    at info, so its output is dropped (a server that does not start fails `wait_ready`)."""
    rlm = str(Path(sys.executable).with_name("rlm"))
    argv = [rlm, "fake-llm", "--scenario", str(scenario), "--port", str(port)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def spawn_rlm_poller(
    port: int, token: str, llm_port: int, model: str, tree: Path | None
) -> subprocess.Popen[bytes]:
    """`rlm poller` as shipped (default settings), its LLM the instant server; with `tree`,
    the poller's code comes from that tree (PYTHONPATH before this tree's editable install)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RLM_", "OPENAI_")) and key != "PYTHONPATH"
    }
    env |= {
        "RLM_BROKER_URL": f"http://{HOST}:{port}",
        "RLM_TENANT_TOKEN": token,
        "OPENAI_BASE_URL": f"http://{HOST}:{llm_port}/v1",
        "RLM_MODEL": model,
        "RLM_LOG_LEVEL": "WARNING",
    }
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    rlm = str(Path(sys.executable).with_name("rlm"))
    return subprocess.Popen([rlm, "poller"], env=env)


def start(argv: list[str], cwd: str, *, quiet: bool = False) -> subprocess.Popen[bytes]:
    # Flask logs every request line to stderr: the bench keeps that cost, not the noise.
    return subprocess.Popen(argv, cwd=cwd, stderr=subprocess.DEVNULL if quiet else None)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_rlms_baseline(python: str, levels: Sequence[int], seconds: float) -> list[Row]:
    """The official library's broker script and poller, as local processes."""
    port = free_port()
    script = str(BENCH / "rlms_baseline.py")
    with tempfile.TemporaryDirectory() as cwd:  # its module calls load_dotenv() on import
        broker = start([python, script, "broker", str(port)], cwd, quiet=True)
        poller = None
        try:
            await wait_ready(port, "/health")
            poller = start([python, script, "poller", str(port)], cwd)

            def make() -> Call:
                connection = RawConnection(port, None)

                async def call() -> None:
                    status, body = await connection.request(
                        "POST", "/enqueue",
                        {"type": "single", "prompt": PROMPT, "model": None, "depth": 1},
                    )  # fmt: skip
                    if status != 200 or body.get("response") != "ok":
                        raise RuntimeError(f"unexpected answer {status} {body}")

                return call

            pids = {"broker": broker.pid, "poller": poller.pid}
            return await measure("rlms (official)", make, levels, max(seconds, 3.0), pids)
        finally:
            if poller is not None:
                stop_process(poller)
            stop_process(broker)


async def wait_ready(port: int, path: str) -> None:
    for _ in range(400):
        try:
            connection = RawConnection(port, None)
            status, _ = await connection.request("GET", path)
            await connection.close()
            if status == 200:
                return
        except ServiceUnreachable:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing answered {path} on port {port}")


async def run_openai(
    port: int,
    tokens: tuple[str, str],
    ours: Mapping[str, int],
    client: aioredis.Redis,
    args: argparse.Namespace,
) -> list[Row]:
    """The shipped `rlm poller` through the openai SDK; alternating with `--before-tree`.

    `tokens`: the tenant's (the poller's) and a session's (the waiters')."""
    trees: list[tuple[str, Path | None]] = [(OPENAI, None)]
    if args.before_tree is not None:
        trees.append((OPENAI_BEFORE, args.before_tree))
    rows: list[Row] = []
    llm_port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        scenario = Path(workdir) / "instant.json"
        scenario.write_text(json.dumps(INSTANT_SCENARIO))
        llm = spawn_fake_llm(llm_port, scenario)
        try:
            await wait_ready(llm_port, "/v1/models")
            round_trip = our_round_trip(port, tokens[1])
            for index in range(args.rounds):
                # Alternate which tree goes first: load drifts fall on both alike.
                for name, tree in trees if index % 2 == 0 else trees[::-1]:
                    poller = spawn_rlm_poller(port, tokens[0], llm_port, args.openai_model, tree)
                    try:
                        pids = {**ours, "poller": poller.pid, "llm": llm.pid}
                        rows += await measure(
                            name, round_trip, args.levels, args.seconds, pids, client
                        )
                    finally:
                        stop_process(poller)
        finally:
            stop_process(llm)
    return rows


async def run(
    port: int, redis: RedisServer, broker_pid: int, args: argparse.Namespace
) -> list[Row]:
    levels: list[int] = args.levels
    seconds: float = args.seconds
    admin = RawConnection(port, ADMIN)
    _, tenant = await admin.request("POST", "/tenants", {"name": "bench"})
    await admin.close()
    tenant_conn = RawConnection(port, tenant["token"])
    _, session = await tenant_conn.request("POST", "/sessions", {})
    await tenant_conn.close()
    assert redis.pid is not None
    ours = {"broker": broker_pid, "redis": redis.pid}
    rows: list[Row] = []

    setups: set[str] = args.setups
    client = aioredis.Redis.from_url(redis.url)
    try:
        if "floor" in setups:

            def floor() -> Call:
                connection = RawConnection(port, None)

                async def call() -> None:
                    await connection.request("GET", "/health/live")
                    await client.ping()

                return call

            rows += await measure("floor (HTTP + PING)", floor, [1], seconds, ours, client)

        if "raw-floor" in setups:
            raw_floors: list[RawFloor] = []

            def raw_floor() -> Call:
                raw_floors.append(RawFloor(port, redis.port))
                return raw_floors[-1].call

            rows += await measure(RAW_FLOOR, raw_floor, [1], seconds, ours, client)
            for one in raw_floors:
                await one.close()

        round_trip = our_round_trip(port, session["token"])
        if "ceiling" in setups:
            stop = asyncio.Event()
            # Two, so that one always waits while the other answers.
            pollers = [
                asyncio.create_task(minimal_poller(port, tenant["token"], stop)) for _ in "ab"
            ]
            rows += await measure(
                "ceiling (minimal poller)", round_trip, levels, seconds, ours, client
            )
            stop.set()
            await asyncio.gather(*pollers)

        # The product as shipped (link, uvloop), then with one of the two changed.
        variants = [
            ("product", "link", "uvloop"),
            ("httpx", "httpx", "uvloop"),
            ("asyncio", "link", "asyncio"),
        ]
        for name, transport, loop in variants:
            if name not in setups:
                continue
            process = spawn_poller(port, tenant["token"], transport, loop)
            try:
                pids = {**ours, "poller": process.pid}
                setup = f"product (Poller, {transport})"
                if loop != "uvloop":
                    setup = f"product (Poller, {loop})"
                some = levels if name == "product" else [levels[0], levels[-1]]
                rows += await measure(setup, round_trip, some, seconds, pids, client)
            finally:
                stop_process(process)
        if "openai" in setups:
            tokens = (tenant["token"], session["token"])
            rows += await run_openai(port, tokens, ours, client, args)
    finally:
        await client.aclose()

    if args.rlms_python and "rlms" in setups:
        rows += await run_rlms_baseline(args.rlms_python, levels, seconds)
    return rows


def report(rows: list[Row]) -> None:
    print(
        f"{'setup':<26} {'c':>3} {'p50 ms':>8} {'p99 ms':>8} {'rt/s':>6} "
        f"{'broker':>7} {'redis':>6} {'poller':>7} {'llm':>6} {'b+r':>6}  load (1/5/15 min)"
    )
    print(f"{'':<55}(CPU ms per round trip)")
    for row in rows:
        cpu = {role: f"{value * 1000:.3f}" for role, value in row.cpu.items()}
        both = sum(v for r, v in row.cpu.items() if r in ("broker", "redis")) * 1000
        print(
            f"{row.setup:<26} {row.level:>3} {row.p50 * 1000:>8.3f} {row.p99 * 1000:>8.2f} "
            f"{row.rate:>6.0f} {cpu.get('broker', '-'):>7} {cpu.get('redis', '-'):>6} "
            f"{cpu.get('poller', '-'):>7} {cpu.get('llm', '-'):>6} {both:>6.3f}  {row.load}"
        )
    print("\nRedis commands per round trip (INFO commandstats; `all` counts those run inside")
    print("scripts too, e.g. each script's PUBLISH):")
    for row in rows:
        if row.commands:
            scripts = row.commands.get("evalsha", 0.0) + row.commands.get("eval", 0.0)
            total = sum(row.commands.values())
            top = sorted(row.commands.items(), key=lambda kv: -kv[1])[:8]
            parts = ", ".join(f"{name} {count:.2f}" for name, count in top)
            print(
                f"  {row.setup:<26} c={row.level:<3} scripts {scripts:4.2f}, publish "
                f"{row.commands.get('publish', 0.0):4.2f}, all {total:5.2f} ({parts}, ...)"
            )
    by = {(row.setup, row.level): row for row in rows}
    floor = by.get(("floor (HTTP + PING)", 1))
    product = "product (Poller, link)"
    print("\nratios (within this run):")
    for setup in ("ceiling (minimal poller)", product, "product (Poller, httpx)"):
        if floor is not None and (setup, 1) in by:
            ratio = by[(setup, 1)].p50 / floor.p50
            print(f"  {setup} c=1 p50 / floor p50:        {ratio:6.2f}x  (target <= 5x)")
    for (setup, level), row in by.items():
        if setup == product and ("ceiling (minimal poller)", level) in by:
            ceiling = by[("ceiling (minimal poller)", level)]
            print(
                f"  product / ceiling at c={level:<3}  p50 {row.p50 / ceiling.p50:5.2f}x, "
                f"rt/s {row.rate / ceiling.rate:5.2f}x"
            )
    for (setup, level), row in by.items():
        if setup == "rlms (official)" and (product, level) in by:
            ours = by[(product, level)]
            print(
                f"  rlms / product at c={level:<3}     p50 {row.p50 / ours.p50:6.1f}x slower, "
                f"product rt/s {ours.rate / row.rate:6.1f}x"
            )
    for (setup, level), row in by.items():
        if setup in ("product (Poller, httpx)", "product (Poller, asyncio)") and (
            (product, level) in by
        ):
            link = by[(product, level)]
            what = setup.removeprefix("product (Poller, ").removesuffix(")")
            print(
                f"  {what} / shipped poller at c={level:<3} poller CPU/rt "
                f"{row.cpu['poller'] / link.cpu['poller']:4.2f}x, p50 {row.p50 / link.p50:4.2f}x, "
                f"rt/s {row.rate / link.rate:4.2f}x"
            )
    if (product, 64) in by:
        row = by[(product, 64)]
        both = (row.cpu["broker"] + row.cpu["redis"]) * 1000
        print(
            f"  product at c=64: {row.rate:.0f} rt/s (target >= 3000), broker + Redis "
            f"{both:.3f} ms CPU/rt (target < 0.35)"
        )
    report_openai(rows)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report_openai(rows: list[Row]) -> None:
    """Medians over the rounds of the openai setups, and issue 13's ratios against the raw
    floor of the same run."""
    rounds: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        if row.setup in (OPENAI, OPENAI_BEFORE):
            rounds.setdefault((row.setup, row.level), []).append(row)
    if not rounds:
        return
    floors = [row.p50 for row in rows if row.setup == RAW_FLOOR]
    print("\nopenai setups, medians over rounds (CPU ms per round trip):")
    print(f"  {'setup':<26} {'c':>3} {'n':>2} {'p50 ms':>8} {'rt/s':>6} {'poller':>7} {'llm':>6}")
    for (setup, level), some in rounds.items():
        print(
            f"  {setup:<26} {level:>3} {len(some):>2} "
            f"{median([r.p50 for r in some]) * 1000:>8.3f} {median([r.rate for r in some]):>6.0f} "
            f"{median([r.cpu['poller'] for r in some]) * 1000:>7.3f} "
            f"{median([r.cpu['llm'] for r in some]) * 1000:>6.3f}"
        )
    for setup in (OPENAI, OPENAI_BEFORE):
        if floors and (setup, 1) in rounds:
            ratio = median([r.p50 for r in rounds[(setup, 1)]]) / median(floors)
            print(f"  {setup} c=1 p50 / raw floor p50: {ratio:6.2f}x  (target <= 17x)")
        if (setup, 64) in rounds:
            cpu = median([r.cpu["poller"] for r in rounds[(setup, 64)]]) * 1000
            print(f"  {setup} poller CPU/rt at c=64: {cpu:.3f} ms  (target < 1.3 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--levels", default="1,16,64", help="concurrencies, comma-separated")
    parser.add_argument(
        "--rlms-python",
        default=sys.executable if importlib.util.find_spec("rlm") else None,
        help="interpreter with the `rlms` package and Flask (default: this one, if it has)",
    )
    parser.add_argument(
        "--setups",
        default=",".join(SETUPS),
        help=f"which setups, comma-separated (default: all of {','.join(SETUPS)})",
    )
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="a copy of an older tree: the openai setup runs its poller too, alternating",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of the openai setup(s), alternating"
    )
    parser.add_argument(
        "--openai-model",
        default="gpt-4o-mini",
        help="model name the openai setup asks for: a priced one (genai-prices) as a "
        "deployment's, or an unknown one to leave pricing out",
    )
    parser.add_argument("--serve-poller", choices=["uvloop", "asyncio"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_poller:
        logging.basicConfig(level=logging.WARNING)
        (uvloop.run if args.serve_poller == "uvloop" else asyncio.run)(serve_poller())
        return
    args.levels = [int(x) for x in args.levels.split(",")]
    args.setups = set(args.setups.split(","))
    if unknown := args.setups - set(SETUPS):
        parser.error(f"unknown setups {sorted(unknown)}; choose from {','.join(SETUPS)}")
    if not args.rlms_python:
        print("baseline skipped: no `rlms` here (uv sync --frozen --group bench)")
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
            uvloop.run(wait_ready(port, "/health/live"))
            rows = uvloop.run(run(port, redis_server, broker.pid, args))
        finally:
            stop_process(broker)
    report(rows)
    print(f"\nmachine: {os.cpu_count()} cores; load at the end {loadavg()}")


if __name__ == "__main__":
    main()
