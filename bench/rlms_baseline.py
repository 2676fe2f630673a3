"""The official RLM library's broker pattern, as shipped, for bench/broker_roundtrip.py.

Runs under an interpreter that has the PyPI package `rlms` (and Flask, which its sandbox
image installs): `uv sync --frozen --group bench`, or any venv with `rlms==0.1.3 flask`.

    python bench/rlms_baseline.py broker PORT     # its broker script (Flask), on PORT
    python bench/rlms_baseline.py poller PORT     # its host-side poller + LM handler

Both are the library's own code, unmodified, started as plain local processes instead of
inside a cloud sandbox: the broker is `rlm.environments.prime_repl._BROKER_SCRIPT` (the
port-parameterised copy of the Modal one), read from the installed source; the poller is
`PrimeREPL._poll_broker` with `_handle_llm_request`, forwarding each request to the
library's `LMHandler` socket server, whose client answers at once. The cloud SDK the module
imports (`prime_sandboxes`) is replaced by an empty placeholder: no sandbox is created.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import signal
import sys
import textwrap
import threading
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


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "broker":
        run_broker(port)
    elif mode == "poller":
        run_poller(port)
    else:
        raise SystemExit(f"unknown mode {mode!r}: broker or poller")


if __name__ == "__main__":
    main()
