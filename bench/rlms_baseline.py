"""The official RLM library, as shipped, for bench/broker_roundtrip.py and bench/rlm_overhead.py.

Runs under an interpreter that has the PyPI package `rlms` (and Flask, which its sandbox
image installs): `uv sync --frozen --group bench`, or any venv with `rlms==0.1.3 flask`.

    python bench/rlms_baseline.py broker PORT     # its broker script (Flask), on PORT
    python bench/rlms_baseline.py poller PORT     # its host-side poller + LM handler
    python bench/rlms_baseline.py run LLM_URL CONTEXT_FILE QUERY   # one whole RLM run

The broker and the poller are the library's own code, unmodified, started as plain local
processes instead of inside a cloud sandbox: the broker is
`rlm.environments.prime_repl._BROKER_SCRIPT` (the port-parameterised copy of the Modal one),
read from the installed source; the poller is `PrimeREPL._poll_broker` with
`_handle_llm_request`, forwarding each request to the library's `LMHandler` socket server,
whose client answers at once. The cloud SDK the module imports (`prime_sandboxes`) is
replaced by an empty placeholder: no sandbox is created.

`run` is one whole run of the library's `RLM` with its in-process `LocalREPL`: the root and
every sub-call go to the scripted LLM at LLM_URL (its own process) through the library's
openai client (its `LMHandler` runs a batch 16 prompts at once); the context is read and its
modules are imported before the clock starts; the wall and CPU time of `RLM.completion` are
printed as one JSON line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import signal
import sys
import textwrap
import threading
import time
import types
from pathlib import Path
from typing import Any

_MODULE = "rlm.environments.prime_repl"


def broker_script(port: int) -> str:
    """The library's broker script for `port`, read from its source without importing it."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{_MODULE} is not installed: `uv sync --frozen --group bench`")
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "_BROKER_SCRIPT"
            and isinstance(node.value, ast.Call)
        ):
            template = ast.literal_eval(node.value.args[0])
            return textwrap.dedent(template).format(broker_port=port)
    raise SystemExit(f"no _BROKER_SCRIPT in {spec.origin}")


def run_broker(port: int) -> None:
    script = broker_script(port)
    exec(compile(script, "<rlms broker>", "exec"), {"__name__": "__main__"})


class _Placeholder(types.ModuleType):
    """Stands for a cloud SDK the module imports but the poller never calls."""

    def __getattr__(self, name: str) -> Any:
        return type(name, (), {})


def run_poller(port: int) -> None:
    sys.modules.setdefault("prime_sandboxes", _Placeholder("prime_sandboxes"))
    repl: Any = importlib.import_module(_MODULE)
    lm_handler: Any = importlib.import_module("rlm.core.lm_handler")
    base_lm: Any = importlib.import_module("rlm.clients.base_lm")
    core_types: Any = importlib.import_module("rlm.core.types")

    class InstantLM(base_lm.BaseLM):  # type: ignore[misc]
        """Answers at once: the bench measures the plumbing, not a model."""

        def completion(self, prompt: Any) -> str:
            return "ok"

        async def acompletion(self, prompt: Any) -> str:
            return "ok"

        def get_usage_summary(self) -> Any:
            return core_types.UsageSummary(model_usage_summaries={})

        def get_last_usage(self) -> Any:
            return core_types.ModelUsageSummary(
                total_calls=1, total_input_tokens=0, total_output_tokens=0
            )

    handler = lm_handler.LMHandler(InstantLM("instant"))
    handler.start()
    # The REPL object without its constructor (which would create a cloud sandbox): only
    # the attributes `_poll_broker` and `_handle_llm_request` read.
    env = object.__new__(repl.PrimeREPL)
    env.broker_url = f"http://127.0.0.1:{port}"
    env.lm_handler_address = handler.address
    env.depth = 1
    env.poller_stop = threading.Event()
    env.pending_llm_calls = []
    env._calls_lock = threading.Lock()
    env.poller_thread = None  # read by its cleanup() (run from __del__): no sandbox to delete
    env.client = env.sandbox_id = None
    signal.signal(signal.SIGTERM, lambda *_: env.poller_stop.set())
    env._poll_broker()
    handler.stop()


def run_rlm(llm_url: str, context_file: str, query: str) -> None:
    rlm_core: Any = importlib.import_module("rlm")
    # Imported before the clock, as the other side's are: its start-up is measured apart
    # (bench/startup.py); the client objects themselves are built by the run, as shipped.
    importlib.import_module("rlm.clients.openai")
    context = Path(context_file).read_text()
    rlm = rlm_core.RLM(
        backend="openai",
        backend_kwargs={"model_name": "fake-root", "base_url": llm_url, "api_key": "bench"},
        environment="local",
        max_iterations=5,
    )
    started, cpu = time.perf_counter(), time.process_time()
    result = rlm.completion(context, root_prompt=query)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    row = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4)}
    print(json.dumps({**row, "answer": str(result.response).strip()}))


def main() -> None:
    mode = sys.argv[1]
    if mode == "broker":
        run_broker(int(sys.argv[2]))
    elif mode == "poller":
        run_poller(int(sys.argv[2]))
    elif mode == "run":
        run_rlm(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}: broker, poller or run")


if __name__ == "__main__":
    main()
