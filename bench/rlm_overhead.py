"""Orchestration overhead of RLM sub-calls: K sequential llm_query vs one llm_query_batched.

Runs an embedded stack (Redis, broker, poller, scripted LLM) and two RLM runs of a scripted
scenario in the "local" environment (code in this process; the sandbox's own cost is
measured by bench/sandbox.py). For each: the wall time of the code block making the K
sub-calls, the time spent inside the scripted LLM (client-side latency of each call, which
includes the injected --delay), and the overhead per sub-call = (wall - LLM time on the
critical path) / K; the critical path is the sum of latencies when sequential, and the
longest call when batched.

    .venv/bin/python bench/rlm_overhead.py --k 64 --delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from host_poller.llm.profiles import LLMSettings
from host_poller.poller.settings import PollerSettings
from host_poller.rlm import RLM, RunBudgets, RunHooks, read_trajectory
from host_poller.settings import HostSettings
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig

ROOT = "You are the root of a Recursive Language Model"


def scenario(k: int, delay_s: float) -> dict[str, Any]:
    sequential = f"answers = [llm_query(f'item {{i}}') for i in range({k})]\nn = len(answers)"
    batched = f"answers = llm_query_batched([f'item {{i}}' for i in range({k})])\nn = len(answers)"
    return {
        "name": "rlm_overhead",
        "rules": [
            {"name": "seq", "match": {"system": ROOT, "any_user": "sequential", "iteration": 0},
             "reply": {"kind": "code", "code": sequential}},
            {"name": "batch", "match": {"system": ROOT, "any_user": "batched", "iteration": 0},
             "reply": {"kind": "code", "code": batched}},
            {"name": "finish", "match": {"system": ROOT, "min_iteration": 1},
             "reply": {"kind": "final", "var": "n"}},
            {"name": "sub", "match": {"system": "^$"}, "reply": {"kind": "text", "text": "ok"},
             "faults": {"delay_s": delay_s}},
        ],
    }  # fmt: skip


async def measure(rlm: RLM, mode: str, k: int) -> dict[str, Any]:
    started = time.perf_counter()
    result = await rlm.acompletion("bench context", f"run the {mode} sub-calls")
    total = time.perf_counter() - started
    assert result.answer == str(k), result
    events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
    subs = [e["latency_s"] for e in events if e["event"] == "sub_call" and e["latency_s"]]
    code_ms = next(e for e in events if e["event"] == "iteration")["code"][0]["duration_ms"]
    root_llm_s = sum(it.latency_s for it in result.iterations)
    critical = sum(subs) if mode == "sequential" else max(subs)
    return {
        "mode": mode,
        "k": k,
        "run_wall_s": round(total, 4),
        "code_block_wall_s": round(code_ms / 1000, 4),
        "sub_llm_time_sum_s": round(sum(subs), 4),
        "root_llm_time_s": round(root_llm_s, 4),
        "overhead_per_sub_call_ms": round((code_ms / 1000 - critical) / k * 1000, 3),
    }


async def main(k: int, delay_s: float, window_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="rlm-bench-") as tmp:
        path = Path(tmp) / "rlm_overhead.json"
        path.write_text(json.dumps(scenario(k, delay_s)))
        host = HostSettings(environment="local", trajectory_dir=Path(tmp) / "trajectories")
        budgets = RunBudgets()
        config = StackConfig(
            scenario=str(path),
            llm_settings=LLMSettings(llm_profiles=()),
            poller_settings=PollerSettings(
                poller_wait_s=1.0, poller_grace_s=2.0, poller_respond_window_s=window_s
            ),
        )
        async with LocalStack(config, rlm_stack_components(host, budgets=budgets)) as stack:
            client = root_client(stack)
            try:
                rlm = RLM(
                    model=client,
                    environment="local",
                    settings=host_settings_for(stack, host),
                    hooks=RunHooks(budgets=budgets),
                )
                await measure(rlm, "batched", k)  # warm-up: connections, imports
                return [await measure(rlm, mode, k) for mode in ("sequential", "batched")]
            finally:
                await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--k", type=int, default=64, help="sub-calls per run")
    parser.add_argument("--delay", type=float, default=0.02, help="scripted LLM delay per call")
    parser.add_argument(
        "--respond-window", type=float, default=0.0, help="poller's answer batching window"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(main(args.k, args.delay, args.respond_window))
    print(
        "environment: local (code in this process, stack embedded in this process too); "
        f"scripted LLM delay {args.delay} s; poller respond window {args.respond_window} s"
    )
    for row in rows:
        print(json.dumps(row))
    seq, bat = rows
    print(
        f"batched is {seq['code_block_wall_s'] / bat['code_block_wall_s']:.1f}x faster than "
        f"sequential for {args.k} sub-calls"
    )
