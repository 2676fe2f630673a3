"""Whole RLM runs against the official library: K sub-calls over a 1 MB context, one by one
(`llm_query` in a loop) or batched (`llm_query_batched`, 16 at once on both sides).

Every run is one fresh process, timed inside it around the run call alone (the process's
start-up, imports and, for rlm-broker, the embedded stack are outside the clock):

- `official`: the PyPI package `rlms`' own `RLM(...).completion` with its in-process
  `LocalREPL` (unsandboxed), run by bench/rlms_baseline.py under --official-python;
- `local` / `pyodide`: rlm-broker's `RLM(...).acompletion` on its embedded stack (Redis,
  broker, the project's poller, the sandbox runtime for pyodide), on uvloop like `rlm ask`.

Both sides talk to the same scripted LLM, started fresh for each run as its own process: the
root writes one code block (the same text for both) that cuts the context into K chunks and
sends one sub-call per chunk; each sub-call answers after --delay. Both sides run at most 16
sub-calls at once (the official `LMHandler`'s batch semaphore; our scripted profile's
concurrency, under the poller's per-tenant limit of 16), so the batched floor is
ceil(K / 16) x delay and the sequential one K x delay; the scripted LLM reports the most
calls it saw at once. Sides alternate within a round, so that load falls on all alike.

Our side starts its clock once the sandbox runtime has its warm sandbox (as a deployed
stack has). CPU is the whole process tree's (ours: Redis and the sandboxes' Deno too,
the pool's refill marked "(new)"), sampled from /proc; the official side is one process.

    .venv/bin/python bench/rlm_overhead.py                  # K=250, 1 MB, 20 ms, 3 rounds
    .venv/bin/python bench/rlm_overhead.py --sides pyodide --modes batched --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT_SYSTEM = "(?i)recursive language model|REPL"
DONE = "subcalls_done"
QUERIES = {"sequential": "run the sequential sub-calls", "batched": "run the batched sub-calls"}
#: Most sub-calls at once on both sides (see the module docstring).
CONCURRENCY = 16
#: How the block ends the run: the `answer` dict, which both REPLs read (the official
#: library's 0.1.3 takes no FINAL_VAR).
FINISH = 'answer["content"] = str(n)\nanswer["ready"] = True'


def code_block(k: int, mode: str) -> str:
    """What the root writes: K chunks of the context, one sub-call each."""
    call = "[llm_query(c) for c in chunks]" if mode == "sequential" else "llm_query_batched(chunks)"
    return "\n".join(
        [
            f"size = -(-len(context) // {k})",
            "chunks = [context[i:i + size] for i in range(0, len(context), size)]",
            f"answers = {call}",
            "n = len(answers)",
            # Built at run time, so that only the REPL's output (never the echoed code)
            # carries the marker the finishing rule looks for.
            f"print('{DONE[:4]}' + '{DONE[4:]}', n)",
            FINISH,
        ]
    )


def scenario(k: int, delay_s: float) -> dict[str, Any]:
    """Sub-calls (no system prompt) answer "ok" after the delay; the root writes the code
    block for the mode its query names, which sets the answer."""
    rules: list[dict[str, Any]] = [
        {"name": "sub", "match": {"system": "^$"}, "reply": {"kind": "text", "text": "ok"},
         "faults": {"delay_s": delay_s}},
        # Only if a REPL did not take the answer from the block: it ends the run without
        # running the sub-calls again (the row's LLM call count would show it).
        {"name": "finish", "match": {"any_user": rf"{DONE} \d+"},
         "reply": {"kind": "code", "code": FINISH}},
    ]  # fmt: skip
    for mode, query in QUERIES.items():
        rules.append(
            {"name": mode, "match": {"system": ROOT_SYSTEM, "any_user": query},
             "reply": {"kind": "code", "code": code_block(k, mode)}}
        )  # fmt: skip
    return {"name": "rlm_overhead", "models": ["fake-root", "fake-sub"], "rules": rules}


def make_context(size: int) -> str:
    """`size` characters of plain words (none of them a word the scenario's rules match)."""
    line = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu\n"
    return (line * (size // len(line) + 1))[:size]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_of(pid: int) -> tuple[str, float, list[int]]:
    """The command name of `pid`, its CPU seconds (user + system), its children's pids."""
    proc = Path(f"/proc/{pid}")
    name, fields_text = (proc / "stat").read_text().split("(", 1)[1].rsplit(")", 1)
    fields = fields_text.split()
    # After the command: state, ppid, ..., utime (12th), stime. Not the reaped children's
    # (cutime): a sandbox sampled alive would count twice, with its start-up.
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = [int(c) for task in (proc / "task").iterdir()
                for c in (task / "children").read_text().split()]  # fmt: skip
    return name, cpu, children


class TreeCPU:
    """CPU seconds of this process and its descendants (Redis, the sandboxes' Deno) while
    in use: sampled every `period_s` from /proc, so that a process ending meanwhile (the
    run's sandbox) still counts up to its last sample."""

    def __init__(self, period_s: float = 0.1) -> None:
        self._period_s = period_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._born: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-cpu", daemon=True)

    def _sample(self) -> None:
        baseline = not self._first
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                name, cpu, children = _cpu_of(pid)
            except OSError:  # ended meanwhile
                continue
            # A process born after the first sample counts from zero.
            if pid not in self._first:
                self._first[pid] = cpu if baseline else 0.0
                if not baseline:
                    self._born.add(pid)
            # The latest name: a process seen before its exec (bwrap -> deno) is the later.
            self._names[pid] = name
            self._last[pid] = cpu
            todo += children

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            self._sample()

    def __enter__(self) -> TreeCPU:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self.by_process.values())

    @property
    def by_process(self) -> dict[str, float]:
        """CPU seconds by command name (python, valkey-server, deno, ...); "(new)" marks
        processes started during the run (the warm pool's refill)."""
        totals: dict[str, float] = {}
        for pid, last in self._last.items():
            name = self._names[pid] + (" (new)" if pid in self._born else "")
            totals[name] = round(totals.get(name, 0.0) + last - self._first[pid], 3)
        return {name: cpu for name, cpu in totals.items() if cpu > 0}


# --- the children ---------------------------------------------------------------------------


def serve_llm(scenario_file: str) -> None:
    """The scripted LLM on a free port, quiet (no access log); prints its URL once bound."""
    from fake_llm import load_scenario, serve_forever
    from rlm_cli.loop import run

    def ready(url: str) -> None:
        print(url, flush=True)

    run(serve_forever(load_scenario(scenario_file), log_level="warning", on_ready=ready))


def wait_pool_ready(runtime_url: str, timeout_s: float = 120.0) -> None:
    """Until the runtime has a warm sandbox: the stack's start-up stays off the clock (as
    for a deployed stack; `rlm ask`'s cold start is measured by bench/startup.py)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{runtime_url}/health", timeout=10) as reply:
            if json.load(reply)["pool"]["idle"] >= 1:
                return
        time.sleep(0.05)
    raise SystemExit("the sandbox runtime's pool did not fill")


async def our_run(environment: str, llm_url: str, context: str, query: str) -> dict[str, Any]:
    """One rlm-broker run on a fresh embedded stack whose LLM is the scripted one at llm_url."""
    from host_poller.llm.profiles import LLMSettings
    from host_poller.poller.settings import PollerSettings
    from host_poller.rlm import RLM, RunBudgets, RunHooks, read_trajectory
    from host_poller.settings import HostSettings
    from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
    from rlm_cli.scripted import scripted_profiles
    from rlm_cli.stack import LocalStack, StackConfig

    root, sub = scripted_profiles(llm_url, concurrency=CONCURRENCY)
    with tempfile.TemporaryDirectory(prefix="rlm-bench-") as tmp:
        host = HostSettings(environment=environment, trajectory_dir=Path(tmp))
        budgets = RunBudgets()
        config = StackConfig(
            llm_settings=LLMSettings(
                llm_profiles=(root, sub), root_profile=root.name, sub_profile=sub.name
            ),
            poller_settings=PollerSettings(
                poller_wait_s=1.0, poller_grace_s=2.0, poller_tenant_concurrency=CONCURRENCY
            ),
        )
        async with LocalStack(config, rlm_stack_components(host, budgets=budgets)) as stack:
            if stack.runtime_url:
                await asyncio.to_thread(wait_pool_ready, stack.runtime_url)
            client = root_client(stack)
            try:
                rlm = RLM(
                    model=client,
                    environment=environment,
                    settings=host_settings_for(stack, host),
                    hooks=RunHooks(budgets=budgets),
                )
                with TreeCPU() as cpu:
                    started = time.perf_counter()
                    result = await rlm.acompletion(context, query)
                    wall = time.perf_counter() - started
            finally:
                await client.aclose()
            events = read_trajectory(result.trajectory_path)  # type: ignore[arg-type]
    code_ms = sum(
        block["duration_ms"] for e in events if e["event"] == "iteration" for block in e["code"]
    )
    return {
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu.seconds, 4),
        "cpu_by_process": cpu.by_process,
        "answer": result.answer,
        "code_s": round(code_ms / 1000, 4),
        "root_llm_s": round(sum(it.latency_s for it in result.iterations), 4),
    }


def child(args: argparse.Namespace) -> None:
    from rlm_cli.loop import run

    context = Path(args.context_file).read_text()
    row = run(our_run(args.environment, args.llm_url, context, args.query))
    print(json.dumps(row), flush=True)


# --- the parent -----------------------------------------------------------------------------


def start_llm(scenario_file: Path) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, __file__, "--serve-llm", str(scenario_file)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http"):
        process.kill()
        raise SystemExit(f"the scripted LLM did not start: {url!r}")
    return process, url


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def llm_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_fake/stats", timeout=10) as reply:
        stats: dict[str, Any] = json.load(reply)
    return stats


def one_run(
    side: str, mode: str, args: argparse.Namespace, scenario_file: Path, context_file: Path
) -> dict[str, Any]:
    """One run in a fresh process against a fresh scripted LLM; its row."""
    llm, url = start_llm(scenario_file)
    try:
        query = QUERIES[mode]
        if side == "official":
            argv = [args.official_python, str(BENCH / "rlms_baseline.py"), "run", url,
                    str(context_file), query]  # fmt: skip
        else:
            argv = [sys.executable, __file__, "--child", "--environment", side, "--llm-url",
                    url, "--context-file", str(context_file), "--query", query]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{side} {mode} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
        row: dict[str, Any] = {"side": side, "mode": mode, **json.loads(lines[-1])}
        stats = llm_stats(url)
    finally:
        stop(llm)
    if row["answer"] != str(args.k):
        raise SystemExit(f"{side} {mode} answered {row['answer']!r}, not {args.k}")
    row["llm_calls"] = stats["requests"]
    row["llm_max_at_once"] = stats["max_in_flight"]
    row["load"] = loadavg()
    return row


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    floors = {
        "sequential": args.k * args.delay,
        "batched": math.ceil(args.k / CONCURRENCY) * args.delay,
    }
    print(
        f"\nK={args.k} sub-calls of {args.delay * 1000:.0f} ms over a "
        f"{args.context_bytes / 1e6:.1f} MB context; at most {CONCURRENCY} at once on both "
        f"sides; medians of {args.rounds} fresh process(es) per cell"
    )
    medians: dict[tuple[str, str], float] = {}
    for mode in args.modes:
        print(f"\n{mode} (floor {floors[mode]:.2f} s of scripted LLM time on the critical path)")
        for side in args.sides:
            cell = [r for r in rows if r["side"] == side and r["mode"] == mode]
            if not cell:
                continue
            wall = statistics.median(r["wall_s"] for r in cell)
            medians[side, mode] = wall
            over = (wall - floors[mode]) / args.k * 1000
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in cell)
            at_once = max(r["llm_max_at_once"] for r in cell)
            cpu = statistics.median(r["cpu_s"] for r in cell) / args.k * 1000
            loads = [float(r["load"].split()[0]) for r in cell]
            print(
                f"  {side:<9} wall {wall:6.2f} s  ({walls})  overhead/sub-call {over:5.2f} ms  "
                f"CPU/sub-call {cpu:5.2f} ms  LLM calls {cell[0]['llm_calls']}, "
                f"at most {at_once} at once  (load {min(loads):.1f}-{max(loads):.1f})"
            )
            names = sorted({name for r in cell for name in r.get("cpu_by_process", {})})
            if names:
                by_name = {
                    name: statistics.median(r["cpu_by_process"].get(name, 0.0) for r in cell)
                    for name in names
                }
                print("            CPU s by process: " + ", ".join(
                    f"{name} {cpu_s:.2f}" for name, cpu_s in by_name.items() if cpu_s >= 0.01
                ))  # fmt: skip
        base = medians.get(("official", mode))
        if base:
            for side in args.sides:
                if side != "official" and (side, mode) in medians:
                    # Also the ratio within each round (the sides of a round ran back to back).
                    rounds = [
                        ours["wall_s"] / theirs["wall_s"]
                        for ours, theirs in zip(
                            [r for r in rows if r["side"] == side and r["mode"] == mode],
                            [r for r in rows if r["side"] == "official" and r["mode"] == mode],
                            strict=True,
                        )
                    ]
                    print(
                        f"  {side} / official: {medians[side, mode] / base:.2f}x of the medians; "
                        f"by round {', '.join(f'{r:.2f}x' for r in rounds)} "
                        f"(median {statistics.median(rounds):.2f}x)"
                    )
    print(f"\nmachine: {os.cpu_count()} cores; load at the end {loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--k", type=int, default=250, help="sub-calls per run")
    parser.add_argument("--delay", type=float, default=0.02, help="scripted LLM delay per call")
    parser.add_argument("--context-bytes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per cell")
    parser.add_argument(
        "--sides", type=lambda s: s.split(","), default=["official", "local", "pyodide"]
    )
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["sequential", "batched"])
    parser.add_argument("--official-python", default="/tmp/rlms_venv/bin/python")
    parser.add_argument("--json", action="store_true", help="also print every run's row")
    # The children (this script, started by itself).
    parser.add_argument("--serve-llm", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--environment", help=argparse.SUPPRESS)
    parser.add_argument("--llm-url", help=argparse.SUPPRESS)
    parser.add_argument("--context-file", help=argparse.SUPPRESS)
    parser.add_argument("--query", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_llm:
        serve_llm(args.serve_llm)
        return
    if args.child:
        child(args)
        return
    if "official" in args.sides and not Path(args.official_python).exists():
        raise SystemExit(
            f"no interpreter at {args.official_python}: give --official-python one with the "
            "PyPI package rlms (`uv sync --frozen --group bench` puts it in .venv), or leave "
            "out the official side with --sides local,pyodide"
        )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rlm-overhead-") as tmp:
        scenario_file = Path(tmp) / "scenario.json"
        scenario_file.write_text(json.dumps(scenario(args.k, args.delay)))
        context_file = Path(tmp) / "context.txt"
        context_file.write_text(make_context(args.context_bytes))
        for round_ in range(args.rounds):
            for mode in args.modes:
                # Alternate the order of the sides round by round.
                sides = args.sides if round_ % 2 == 0 else list(reversed(args.sides))
                for side in sides:
                    row = one_run(side, mode, args, scenario_file, context_file)
                    if args.json:
                        print(json.dumps(row), flush=True)
                    rows.append(row)
    report(rows, args)


if __name__ == "__main__":
    main()
