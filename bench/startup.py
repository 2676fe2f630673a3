"""`rlm ask`'s start-up, end to end and broken down: `python bench/startup.py [--reps N]`.

End to end: `rlm ask --scenario count_words` (the scripted LLM on an embedded stack: Redis,
broker, tenant, LLM, poller and, for `pyodide`, the sandbox runtime) over a small context,
each repetition a fresh process in a fresh directory, with environment `local` and
`pyodide`; the median wall time from spawn to exit, with /proc/loadavg; and under it the
start-up that issue 13's target names ("process + embedded stack"): from spawn to the stack
ready, i.e. before the run (the `embedded stack:` line `rlm ask` writes to stderr then).
For the official library the same row is from spawn to its model's first call.

Baseline, when /tmp/rlms_venv has the official library (PyPI `rlms`): the same run shape in a
fresh process (`RLM.completion` with its local REPL: one root turn that splits the context,
counts with `llm_query_batched` and sets its `answer`), the model scripted in-process (a
`BaseLM` that answers at once), so without the openai SDK; and the same plus
`import rlm.clients.openai`, what its start-up costs with a real provider.

`--variants`: only `rlm ask` against itself with each of its start-up measures turned off
(no collections during the imports, none during the stack's start, the lean transport for
the stack's own clients, and all with the SDK imported up front: the code before them),
interleaved round by round, with each process's CPU.

`--trees A,B`: only `rlm ask` run from each source tree (e.g. `git archive HEAD` unpacked in
/tmp/before, and this one), interleaved round by round: a change measured against the code
before it on a shared machine.

Breakdown, in a fresh process of the project: interpreter, imports of `rlm ask`'s module
(and the heaviest packages from `python -X importtime`), each stack component's start,
the run itself (one session, two root turns, eight sub-calls) and the stack's stop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox_runtime.service.memory import descendants, rollup_kib, snapshot_file_kib

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
RLM = ROOT / ".venv" / "bin" / "rlm"
RLMS_PYTHON = Path("/tmp/rlms_venv/bin/python")
QUESTION = "How often is the word 'fox' used?"
CONTEXT = "the quick brown fox jumps over the lazy dog\n" * 600  # ~26 kB, 7 chunks


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


def environ() -> dict[str, str]:
    """The user's environment minus anything that points `rlm ask` at another stack; bytecode
    is written, as an installed package has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["RLM_LOG_LEVEL"] = "WARNING"
    return env


# The line each side writes to stderr once it is ready to run: `rlm ask` once its embedded
# stack has started (before the session, the run's first step), the official library's
# scripted model on its first call (its LM handler and REPL are up, the run begins).
READY_LINES = ("embedded stack:", "official: first LM call")


@dataclass(frozen=True)
class Timing:
    wall: float
    """Seconds from spawn to exit."""
    ready: float | None
    """Seconds from spawn to the first READY_LINES line; None: none was written."""
    cpu: float
    """User + system seconds of the process and of the children it waited for (Redis)."""


def timed(argv: Sequence[str], *, cwd: Path, stdin: str | None = None) -> Timing:
    """One fresh process of `argv`; a failure stops the bench with its stderr."""
    start = time.perf_counter()
    child = subprocess.Popen(
        argv, cwd=cwd, env=environ(), text=True,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stderr is not None
    if stdin is not None:
        assert child.stdin is not None
        child.stdin.write(stdin)
        child.stdin.close()
    ready: float | None = None
    lines: list[str] = []
    for line in child.stderr:  # line-buffered on the child's side: read as written
        if ready is None and line.startswith(READY_LINES):
            ready = time.perf_counter() - start
        lines.append(line)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"{argv[:3]} failed ({returncode}):\n{''.join(lines)[-3000:]}")
    return Timing(wall, ready, usage.ru_utime + usage.ru_stime)


def median_of(
    reps: int, argv: Sequence[str], *, stdin: str | None = None
) -> tuple[float, float | None, str]:
    """(median wall seconds over `reps` fresh processes after one warm-up, median seconds to
    the ready line or None, load before)."""
    before = load()
    walls, readies = [], []
    for index in range(reps + 1):
        with tempfile.TemporaryDirectory(prefix="rlm-startup-") as tmp:
            (Path(tmp) / "ctx.txt").write_text(CONTEXT)
            timing = timed(argv, cwd=Path(tmp), stdin=stdin)
        if index:  # the first one writes bytecode and warms the page cache
            walls.append(timing.wall)
            if timing.ready is not None:
                readies.append(timing.ready)
    return statistics.median(walls), statistics.median(readies) if readies else None, before


# `rlm ask` with one of its start-up measures turned off, to see what each pays: the same
# command, patched in its own process before `cli` runs.
_GC_ON = "import click\nfrom rlm_cli import main\nmain._LazyGroup.main = click.Group.main\n"
_GC_STACK = (
    "import contextlib\nfrom rlm_cli import ask\nask._collections_paused = contextlib.nullcontext\n"
)
_HTTPX = (
    "from rlm_cli import stack\nfrom rlm_wire.transport import HttpxTransport\n"
    "stack.KeepAliveLink = HttpxTransport\n"
)
VARIANTS = {
    "with collections during the imports": _GC_ON,
    "with collections during the stack's start": _GC_STACK,
    "with httpx2 for the stack's own clients": _HTTPX,
    "none of them, openai imported up front": f"import openai\n{_GC_ON}{_GC_STACK}{_HTTPX}",
}


def variant_argv(patch: str, argv: Sequence[str]) -> list[str]:
    code = (
        f"import sys\n{patch}from rlm_cli.main import cli\nsys.argv[0] = 'rlm'\nsys.exit(cli())\n"
    )
    return [str(PYTHON), "-c", code, *argv[1:]]


def tree_argv(tree: str, argv: Sequence[str]) -> list[str]:
    """`argv` run from the source tree `tree` (a copy of the project, e.g. `git archive HEAD`
    unpacked): PYTHONPATH puts it ahead of the editable install."""
    return ["env", f"PYTHONPATH={Path(tree).resolve()}", *argv]


def interleaved(reps: int, commands: dict[str, list[str]]) -> None:
    """Each command once per round, `reps` rounds after one warm-up round: on a busy machine
    the load then moves every command alike. Medians and minimums of the wall times, and
    the median CPU (which the load moves less)."""
    timings: dict[str, list[Timing]] = {label: [] for label in commands}
    loads = []
    for index in range(reps + 1):
        for label, argv in commands.items():
            loads.append(float(load()))
            with tempfile.TemporaryDirectory(prefix="rlm-startup-") as tmp:
                (Path(tmp) / "ctx.txt").write_text(CONTEXT)
                timing = timed(argv, cwd=Path(tmp))
            if index:
                timings[label].append(timing)
    print(f"  interleaved, {reps} rounds, load {min(loads):.2f}-{max(loads):.2f}: end to end "
          "median / min, to stack ready median / min, CPU median")  # fmt: skip
    for label, runs in timings.items():
        walls = [t.wall for t in runs]
        readies = [t.ready if t.ready is not None else float("nan") for t in runs]
        figures = [statistics.median(walls), min(walls), statistics.median(readies),
                   min(readies), statistics.median(t.cpu for t in runs)]  # fmt: skip
        ms = [f"{x * 1000:6.0f}" for x in figures]
        print(f"    {label:<46} {ms[0]} / {ms[1]} ms   {ms[2]} / {ms[3]} ms   {ms[4]} ms",
              flush=True)  # fmt: skip


def row(label: str, seconds: float, loadavg: str, note: str = "") -> None:
    print(f"{label:<52} {seconds * 1000:8.0f} ms   load {loadavg}  {note}", flush=True)


def rows(label: str, ready_label: str, measured: tuple[float, float | None, str]) -> None:
    """The end-to-end row and, when the ready line was seen, the start-up row under it."""
    seconds, ready, loadavg = measured
    row(label, seconds, loadavg)
    if ready is not None:
        row(f"  {ready_label}", ready, loadavg)


# The same command as the code before issue 13's start-up work ran it: every command module
# imported to find `ask`, the stack's components started one after another, 2 warm sandboxes,
# no freeze at exit.
BEFORE = r"""
import atexit, gc, os, sys
os.environ.setdefault("RLM_SANDBOX_POOL_SIZE", "2")
from rlm_cli import embedded, main, stack
atexit.unregister(gc.freeze)
for module in main._COMMAND_MODULES:
    main._commands_of(module)
for component in (*stack.StackComponent.__subclasses__(), embedded.SubRLMComponent,
                  stack.BrokerComponent, stack.SandboxRuntimeComponent):
    component.needs = None
sys.argv[0] = "rlm"
main.cli()
"""


# --- the official library, in a fresh process -----------------------------------------------

OFFICIAL = r'''
import re, sys, time
start = time.perf_counter()
if sys.argv[1] == "openai":
    import rlm.clients.openai
import rlm.core.rlm as core
from rlm.clients.base_lm import BaseLM
from rlm.core.types import ModelUsageSummary, UsageSummary

CODE = """```repl
text = context if isinstance(context, str) else "\\n".join(map(str, context))
import re
chunks, current, size = [], [], 0
for piece in re.split(r"(\\s+)", text):
    current.append(piece)
    size += len(piece)
    if size >= 4000 and piece.isspace():
        chunks.append("".join(current))
        current, size = [], 0
if "".join(current).strip():
    chunks.append("".join(current))
ask = "Count occurrences of the word 'fox' in the text below. Reply with the integer only."
prompts = [ask + "\\n" + c for c in chunks]
total = sum(int(a.strip()) for a in llm_query_batched(prompts))
answer["content"] = str(total)
answer["ready"] = True
```"""


class Scripted(BaseLM):
    def completion(self, prompt):
        if not getattr(Scripted, "seen", False):
            Scripted.seen = True
            print("official: first LM call", file=sys.stderr, flush=True)
        if isinstance(prompt, str):
            return str(len(re.findall(r"\bfox\b", prompt.split("\n", 1)[1])))
        return CODE

    async def acompletion(self, prompt):
        return self.completion(prompt)

    def get_usage_summary(self):
        return UsageSummary(model_usage_summaries={})

    def get_last_usage(self):
        return ModelUsageSummary(total_calls=1, total_input_tokens=0, total_output_tokens=0)


core.get_client = lambda backend, kwargs: Scripted("scripted")
result = core.RLM(backend="openai", environment="local").completion(
    sys.stdin.read(), root_prompt="How often is the word 'fox' used?"
)
assert result.response.strip() == "600", result.response
'''


# --- the breakdown, in a fresh process of the project ---------------------------------------

BREAKDOWN = r"""
import asyncio, gc, json, sys, time
t0 = time.perf_counter()
gc.disable()  # as `rlm` imports a command's module
import rlm_cli.main, rlm_cli.ask
from rlm_cli.logs import configure_logging
from rlm_cli.printer import printer_for
configure_logging("WARNING", "json")
console = printer_for(sys.stderr)  # as `rlm ask`: rich's console only on a terminal
gc.freeze()
gc.enable()
t_import = time.perf_counter()
from host_poller.rlm.api import RLM
from host_poller.rlm.budget import RunBudgets
from host_poller.settings import HostSettings
from rlm_cli import loop
from rlm_cli.embedded import host_settings_for, rlm_stack_components, root_client
from rlm_cli.stack import LocalStack, StackConfig

phases = {"imports of `rlm ask`, logging": t_import - t0}


def timing(component):
    start = component.start

    async def timed_start(stack):
        began = time.perf_counter()
        await start(stack)
        phases[f"  component {component.name}"] = time.perf_counter() - began

    component.start = timed_start
    return component


async def main():
    settings = HostSettings(environment=sys.argv[1])
    budgets = RunBudgets()
    components = [timing(c) for c in rlm_stack_components(settings, budgets=budgets)]
    began = time.perf_counter()
    with rlm_cli.ask._collections_paused():  # as `rlm ask` starts its stack
        stack = await LocalStack(StackConfig(scenario="count_words"), components).start()
    phases["stack start (all components)"] = time.perf_counter() - began
    phases["process + embedded stack (interpreter start not included)"] = time.perf_counter() - t0
    try:
        began = time.perf_counter()
        client = root_client(stack)
        rlm = RLM(model=client, settings=host_settings_for(stack, settings))
        result = await rlm.acompletion(sys.stdin.read(), "How often is the word 'fox' used?")
        assert result.answer == "600", result.answer
        phases["the run (first session, 2 turns, 7 sub-calls)"] = time.perf_counter() - began
        await client.aclose()
    finally:
        began = time.perf_counter()
        await stack.stop()
        phases["stack stop"] = time.perf_counter() - began

loop.run(main())
phases["total in process"] = time.perf_counter() - t0
print(json.dumps(phases))
"""


def breakdown(environment: str, reps: int) -> None:
    runs: list[dict[str, float]] = []
    before = load()
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="rlm-startup-") as tmp:
            done = subprocess.run(
                [str(PYTHON), "-c", BREAKDOWN, environment],
                cwd=tmp, env=environ(), capture_output=True, text=True, input=CONTEXT,
            )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"breakdown failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for phase in runs[0]:
        row(f"  {environment}: {phase}", statistics.median(r[phase] for r in runs), before)


def heaviest_imports(module: str, count: int) -> None:
    """The packages that cost most when `module` is imported (`-X importtime`, cumulative)."""
    done = subprocess.run(
        [str(PYTHON), "-X", "importtime", "-c", f"import {module}"],
        env=environ(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    tops: dict[str, int] = {}
    for line in done.stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if found and found.group(3).split(".")[0] != module.split(".")[0]:
            top = found.group(3).split(".")[0]
            tops[top] = max(tops.get(top, 0), int(found.group(1)))
    ranked = sorted(tops.items(), key=lambda item: -item[1])[:count]
    print(f"  heaviest imports under {module} (cumulative, one run, load {load()}): "
          + ", ".join(f"{name} {us / 1000:.0f} ms" for name, us in ranked))  # fmt: skip


# --- memory of the idle `rlm up` stack ------------------------------------------------------


def _command_name(pid: int) -> str:
    """The process's name, or "" once it has exited (a start-up's short-lived helpers)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def idle_stack_memory(pool_size: int, settle_s: float) -> None:
    """PSS and RSS of each process of an idle `rlm up` (environment pyodide), once its warm
    pool holds `pool_size` sandboxes and `settle_s` passed."""
    with tempfile.TemporaryDirectory(prefix="rlm-up-") as tmp:
        env = environ() | {
            "RLM_ENVIRONMENT": "pyodide",
            "RLM_REDIS_DIR": f"{tmp}/redis",
            "RLM_SANDBOX_POOL_SIZE": str(pool_size),
        }
        argv = [str(RLM), "up", "--port", "0", "--sandbox-port", "0", "--llm-port", "0",
                "--env-file", f"{tmp}/stack.env"]  # fmt: skip
        up = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pids = [up.pid, *descendants(up.pid, max_depth=8)]
                denos = [p for p in pids if _command_name(p) == "deno"]
                if Path(f"{tmp}/stack.env").exists() and len(denos) >= pool_size:
                    break
                time.sleep(0.2)
            else:
                raise SystemExit("rlm up did not fill its pool within 120 s")
            time.sleep(settle_s)
            total_pss = total_rss = 0.0
            print(f"idle `rlm up` (pyodide), warm pool {pool_size}, load {load()}:")
            for pid in [up.pid, *descendants(up.pid, max_depth=8)]:
                name = _command_name(pid)
                m = rollup_kib(pid)
                if not name or not m:  # exited meanwhile
                    continue
                total_pss += m["Pss"] / 1024
                total_rss += m["Rss"] / 1024
                print(f"  {name:<16} pid {pid:>7}  PSS {m['Pss'] / 1024:7.1f} MiB  "
                      f"RSS {m['Rss'] / 1024:7.1f} MiB")  # fmt: skip
            # The sandboxes' snapshot file: what no process maps is in no PSS above.
            held, mapped = snapshot_file_kib([up.pid, *descendants(up.pid, max_depth=8)])
            total_pss += (held - mapped) / 1024
            print(f"  snapshot file    held {held / 1024:7.1f} MiB, not mapped "
                  f"{(held - mapped) / 1024:.1f} MiB (added to the total)")  # fmt: skip
            print(f"  total            PSS {total_pss:7.1f} MiB  RSS {total_rss:7.1f} MiB")
        finally:
            up.terminate()
            up.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per figure")
    parser.add_argument("--environments", default="local,pyodide")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="only `rlm ask` against itself with each start-up measure off, interleaved",
    )
    parser.add_argument(
        "--before", action="store_true", help="also the start-up as it was (emulated)"
    )
    parser.add_argument(
        "--trees",
        default="",
        help="only `rlm ask` run from each of these source trees (comma-separated), interleaved",
    )
    parser.add_argument(
        "--memory", default="", help="only the idle `rlm up` stack's memory, for these pool sizes"
    )
    args = parser.parse_args()
    if args.memory:
        for size in args.memory.split(","):
            idle_stack_memory(int(size), settle_s=3.0)
        return
    environments = args.environments.split(",")
    if args.trees:
        for environment in environments:
            argv = [str(RLM), "ask", "--scenario", "count_words", "--environment", environment,
                    "--context", "ctx.txt", "--no-progress", QUESTION]  # fmt: skip
            interleaved(
                args.reps,
                {f"{tree}, {environment}": tree_argv(tree, argv) for tree in args.trees.split(",")},
            )
        return
    if args.variants:
        for environment in environments:
            argv = [str(RLM), "ask", "--scenario", "count_words", "--environment", environment,
                    "--context", "ctx.txt", "--no-progress", QUESTION]  # fmt: skip
            commands = {f"rlm ask, {environment}": variant_argv("", argv)}
            commands.update({name: variant_argv(p, argv) for name, p in VARIANTS.items()})
            interleaved(args.reps, commands)
        return
    print(f"median of {args.reps} fresh processes each (after one warm-up); machine: "
          f"{os.cpu_count()} cores")  # fmt: skip
    for environment in environments:
        argv = [str(RLM), "ask", "--scenario", "count_words", "--environment", environment,
                "--context", "ctx.txt", "--no-progress", QUESTION]  # fmt: skip
        rows(
            f"rlm ask, {environment}, end to end",
            "process + embedded stack (spawn -> stack ready)",
            median_of(args.reps, argv),
        )
        if args.before:
            rows(
                f"  the same as before issue 13's start-up work ({environment})",
                "  process + embedded stack, before",
                median_of(args.reps, [str(PYTHON), "-c", BEFORE, *argv[1:]]),
            )
    if RLMS_PYTHON.exists():
        for variant in ("scripted", "openai"):
            argv = [str(RLMS_PYTHON), "-c", OFFICIAL, variant]
            rows(
                f"official rlms, local REPL, {variant} LM"
                + (" (+ its openai client)" if variant == "openai" else ""),
                "start-up (spawn -> first LM call)",
                median_of(args.reps, argv, stdin=CONTEXT),
            )
    else:
        print(f"official library: skipped, no {RLMS_PYTHON} (a venv with `rlms==0.1.3`)")
    if args.no_breakdown:
        return
    print("breakdown:")
    for label, argv in (
        ("interpreter (python -c pass)", [str(PYTHON), "-c", "pass"]),
        ("python -c 'import rlm_cli.main'", [str(PYTHON), "-c", "import rlm_cli.main"]),
        ("python -c 'import rlm_cli.ask'", [str(PYTHON), "-c", "import rlm_cli.ask"]),
        ("rlm --help (every command module)", [str(RLM), "--help"]),
    ):
        seconds, _, loadavg = median_of(args.reps, argv)
        row(f"  {label}", seconds, loadavg)
    heaviest_imports("rlm_cli.ask", 8)
    for environment in environments:
        breakdown(environment, args.reps)


if __name__ == "__main__":
    main()
