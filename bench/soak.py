"""A soak: real processes under a steady load, watched for what grows.

    .venv/bin/python bench/soak.py [--minutes 5] [--rate 40] [--report-s 30]
                                   [--result-ttl 60] [--grace 30] [--answerer poller]

Starts, as separate processes on loopback: an embedded Redis with its append-only file on
(the default), `rlm broker`, `rlm fake-llm` (an echo scenario) and `rlm poller` (the real
Poller, admin token). With `--answerer minimal`, an instant answerer in this process
replaces the poller: that measures the broker and Redis alone.

This process is the sandbox side: it opens sessions and sends `llm_query`-like calls at a
steady rate, each with an Idempotency-Key, re-waiting on 202 like the exec script. Every
`--report-s` it prints one line: calls started and answered in the window, p50/p99 latency,
errors, calls in flight, Redis `used_memory` and key count, the RSS and open file
descriptors of every process, and the machine's load. Memory and keys should reach a
plateau once results start to expire (`--result-ttl`, plus `--grace` for Idempotency-Keys):
at rate r, about r x (result ttl + grace) idempotency keys and r x result ttl request
hashes. At the end: accepted / answered / errors / lost, and a JSON summary (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2
import redis.asyncio as aioredis

from broker.redis_server import RedisServer, free_port
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import WireError

ADMIN = "soak-admin-token"
HOST = "127.0.0.1"
ECHO_RULE = {
    "name": "echo",
    "match": {"user": "^(?P<q>.*)$"},
    "reply": {"kind": "text", "text": "echo: ${q}"},
}
ECHO = {"name": "echo", "rules": [ECHO_RULE]}
META = {"run_id": "soak", "depth": 0, "max_depth": 1}
#: Calls still unanswered past this are counted as lost (the broker's own wait is 25 s).
CALL_DEADLINE_S = 120.0


@dataclass
class Window:
    started: int = 0
    answered: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Totals:
    started: int = 0
    finished: int = 0
    accepted: int = 0
    answered: int = 0
    errors: int = 0
    lost: int = 0
    wrong: int = 0
    all_latencies: list[float] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _child_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RLM_")} | {
        "RLM_LOG_LEVEL": "WARNING",
        **extra,
    }


@contextmanager
def processes(args: argparse.Namespace, workdir: Path) -> Iterator[dict[str, Any]]:
    """Redis, broker, fake LLM and poller as child processes; stopped in reverse order."""
    rlm = str(Path(sys.executable).with_name("rlm"))
    children: list[subprocess.Popen[bytes]] = []
    redis_server = RedisServer(data_dir=workdir / "redis")
    redis_server.start()
    try:
        broker_port, llm_port = free_port(), free_port()
        scenario = workdir / "echo.json"
        scenario.write_text(json.dumps(ECHO))
        broker_env = _child_env(
            RLM_REDIS_URL=redis_server.url,
            RLM_ADMIN_TOKEN=ADMIN,
            RLM_RESULT_TTL_S=str(args.result_ttl),
            RLM_IDEMPOTENCY_GRACE_S=str(args.grace),
        )
        log = (workdir / "children.log").open("wb")
        children.append(
            subprocess.Popen(
                [rlm, "broker", "--port", str(broker_port)], env=broker_env, stdout=log, stderr=log
            )
        )
        children.append(
            subprocess.Popen(
                [rlm, "fake-llm", "--port", str(llm_port), "--scenario", str(scenario)],
                env=_child_env(),
                stdout=log,
                stderr=log,
            )
        )
        broker_url = f"http://{HOST}:{broker_port}"
        llm_url = f"http://{HOST}:{llm_port}/v1"
        _wait_http(f"{broker_url}/health/live")
        _wait_http(f"{llm_url}/models")
        profile = {"name": "sub", "base_url": llm_url, "model": "fake-sub", "max_retries": 0}
        poller_env = _child_env(
            RLM_BROKER_URL=broker_url,
            RLM_ADMIN_TOKEN=ADMIN,
            RLM_LLM_PROFILES=json.dumps([profile]),
            RLM_SUB_PROFILE="sub",
            RLM_ROOT_PROFILE="sub",
            RLM_LEDGER_PATH=str(workdir / "usage.sqlite3"),
            RLM_TRAJECTORY_DIR=str(workdir / "trajectories"),
            RLM_POLLER_CONCURRENCY=str(args.poller_concurrency),
            RLM_POLLER_TENANT_CONCURRENCY=str(args.poller_concurrency),
        )
        pids = {"redis": redis_server.pid or 0, "broker": children[0].pid}
        pids |= {"fake-llm": children[1].pid, "soak": os.getpid()}
        if args.answerer == "poller":
            metrics_port = free_port()
            command = [rlm, "poller", "--metrics-port", str(metrics_port)]
            children.append(subprocess.Popen(command, env=poller_env, stdout=log, stderr=log))
            _wait_http(f"http://{HOST}:{metrics_port}/metrics")  # the poller is up
            pids["poller"] = children[-1].pid
        yield {"broker_url": broker_url, "redis_url": redis_server.url, "pids": pids}
    finally:
        for child in reversed(children):
            child.terminate()
        for child in reversed(children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        redis_server.stop()


def _wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx2.get(url, timeout=1)
            return
        except httpx2.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


async def one_call(client: BrokerClient, index: int, window: list[Window], totals: Totals) -> None:
    prompt = f"q{index}"
    key = uuid.uuid4().hex
    started = time.monotonic()
    request = p.LLMRequest(prompt=prompt, depth=1)
    result: p.RequestResult | None = None
    while time.monotonic() - started < CALL_DEADLINE_S:
        try:
            if result is None:
                result = await client.enqueue(request, wait_s=25, idempotency_key=key)
                totals.accepted += 1
            if result.status != "pending":
                break
            result = await client.get_request(result.id, wait_s=25)
        except WireError:
            await asyncio.sleep(0.5)  # an outage: retry (the same key, the same id)
    totals.finished += 1
    if result is None or result.status == "pending":
        totals.lost += 1
        return
    elapsed = time.monotonic() - started
    current = window[0]
    if result.status == "done":
        current.answered += 1
        totals.answered += 1
        if result.response != f"echo: {prompt}":
            totals.wrong += 1
        current.latencies.append(elapsed)
        totals.all_latencies.append(elapsed)
    else:
        current.errors += 1
        totals.errors += 1


async def minimal_answerer(url: str, token: str, stop: asyncio.Event) -> None:
    """Instead of `rlm poller`: drains and answers at once, as `echo: <prompt>`, batched."""
    async with BrokerClient(url, token, poller_id="soak-minimal") as client:
        while not stop.is_set():
            batch = await client.pending(max_items=64, wait_s=1)
            if batch.requests:
                answers = [p.Answer(id=r.id, response=f"echo: {r.prompt}") for r in batch.requests]
                await client.respond_batch(answers)


async def report(
    stack: dict[str, Any],
    window: Window,
    totals: Totals,
    elapsed_s: float,
    redis: aioredis.Redis,
) -> dict[str, Any]:
    info = await redis.info("memory")
    keys = await redis.dbsize()
    procs: dict[str, dict[str, float | int | None]] = {}
    for name, pid in stack["pids"].items():
        try:
            procs[name] = {"rss_mib": round(rss_mib(pid), 1), "fds": open_fds(pid)}
        except OSError:  # it exited: the next report shows it
            procs[name] = {"rss_mib": None, "fds": None}
    load = loadavg()
    p50, p99 = pct(window.latencies, 0.5), pct(window.latencies, 0.99)
    row: dict[str, Any] = {
        "t_s": round(elapsed_s),
        "started": window.started,
        "answered": window.answered,
        "errors": window.errors,
        "in_flight": totals.started - totals.finished,
        "p50_s": round(p50, 4),
        "p99_s": round(p99, 4),
        "redis_used_mib": round(int(info["used_memory"]) / 2**20, 2),
        "redis_keys": int(keys),
        "processes": procs,
        "loadavg": load,
    }
    proc_text = " ".join(f"{n}={v['rss_mib']}M/{v['fds']}fd" for n, v in procs.items())
    print(
        f"t={row['t_s']:>4}s calls={window.started:>5} ok={window.answered:>5} "
        f"err={window.errors} in_flight={row['in_flight']} "
        f"p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms "
        f"redis={row['redis_used_mib']}MiB keys={keys} {proc_text} "
        f"load={' '.join(load)}",
        flush=True,
    )
    return row


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="rlm-soak-") as tmp,
        processes(args, Path(tmp)) as stack,
    ):
        url = stack["broker_url"]
        async with BrokerClient(url, ADMIN) as admin:
            tenant = await admin.create_tenant("soak")
        redis = aioredis.Redis.from_url(stack["redis_url"])
        tenant_client = BrokerClient(url, tenant.token)
        sessions = []
        for _ in range(args.sessions):
            created = await tenant_client.create_session(metadata=META)
            sessions.append(BrokerClient(url, created.token, timeout_s=60.0))
        stop = asyncio.Event()
        answerer = None
        if args.answerer == "minimal":
            answerer = asyncio.create_task(minimal_answerer(url, ADMIN, stop))
        totals = Totals()
        window = [Window()]
        rows = []
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        next_report = start + args.report_s
        end = start + args.minutes * 60
        index = 0
        try:
            while (now := time.monotonic()) < end:
                due = start + index / args.rate
                if due > now:
                    await asyncio.sleep(min(due - now, max(0.0, next_report - now)))
                if time.monotonic() >= next_report:
                    rows.append(
                        await report(stack, window[0], totals, time.monotonic() - start, redis)
                    )
                    window[0] = Window()
                    next_report += args.report_s
                    continue
                if time.monotonic() < due:
                    continue
                client = sessions[index % len(sessions)]
                task = asyncio.create_task(one_call(client, index, window, totals))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                window[0].started += 1
                totals.started += 1
                index += 1
            if tasks:
                await asyncio.wait(tasks, timeout=CALL_DEADLINE_S + 10)
            rows.append(await report(stack, window[0], totals, time.monotonic() - start, redis))
        except BaseException:
            traceback.print_exc()  # before the calls still running fail on closed clients
            raise
        finally:
            stop.set()
            if answerer is not None:
                await answerer
            for client in sessions:
                await client.aclose()
            await tenant_client.aclose()
            await redis.aclose()
    lat = totals.all_latencies
    summary = {
        "minutes": args.minutes,
        "answerer": args.answerer,
        "rate_per_s": args.rate,
        "accepted": totals.accepted,
        "answered": totals.answered,
        "errors": totals.errors,
        "lost_or_unanswered_in_120s": totals.lost,
        "wrong_answers": totals.wrong,
        "p50_s": round(statistics.median(lat), 4) if lat else None,
        "p99_s": round(pct(lat, 0.99), 4) if lat else None,
        "reports": rows,
    }
    print(
        f"accepted={totals.accepted} answered={totals.answered} errors={totals.errors} "
        f"lost={totals.lost} wrong={totals.wrong} p50={summary['p50_s']} p99={summary['p99_s']}"
    )
    return summary


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="How long to run.")
    parser.add_argument("--rate", type=float, default=40.0, help="Calls started per second.")
    parser.add_argument("--report-s", type=float, default=30.0, help="Seconds between reports.")
    parser.add_argument("--sessions", type=int, default=8, help="Sessions the calls spread over.")
    parser.add_argument(
        "--result-ttl", type=int, default=60, help="The broker's RLM_RESULT_TTL_S (seconds)."
    )
    parser.add_argument(
        "--grace", type=int, default=30, help="The broker's RLM_IDEMPOTENCY_GRACE_S (seconds)."
    )
    parser.add_argument(
        "--poller-concurrency", type=int, default=64, help="The poller's concurrency."
    )
    parser.add_argument(
        "--answerer",
        choices=["poller", "minimal"],
        default="poller",
        help="Who answers: `rlm poller` with the fake LLM, or a minimal in-process answerer "
        "(the broker and Redis alone).",
    )
    parser.add_argument("--json", type=Path, help="Also write the summary here as JSON.")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl+C, so the child processes are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit)
    summary = asyncio.run(soak(args))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
