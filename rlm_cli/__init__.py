"""The composition root: the `rlm` command line, the local stack, and the Python one-liner.

`from rlm_cli import RLM` is `host_poller.rlm.RLM` that starts an embedded stack when no
broker is set (`rlm_cli.api_stack`); `Contexts(a, b)` gives one run several contexts. They
are loaded on first use, so that `rlm` commands start without importing the RLM loop.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RLM":
        from rlm_cli.api_stack import RLM

        return RLM
    if name == "Contexts":
        from host_poller.rlm.types import Contexts

        return Contexts
    raise AttributeError(f"module 'rlm_cli' has no attribute {name!r}")
