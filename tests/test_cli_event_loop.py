"""Every `rlm` command that serves or polls runs on uvloop (issue 13: the stdlib loop cost
the poller and the stack CPU on every request); one-shot client commands may use asyncio."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import rlm_cli
from rlm_cli import loop
from rlm_wire.serving import uvicorn_config

#: The command modules whose commands serve or poll: `rlm ask` (its embedded stack), `rlm up`
#: and `rlm poller`, `rlm serve`, `rlm view`, `rlm host`.
SERVING = ("ask", "host_commands", "poller_commands", "serve_commands", "view_commands")


def test_the_commands_loop_is_uvloop() -> None:
    async def running_loop() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop.run(running_loop()).startswith("uvloop")


def test_every_command_that_serves_or_polls_runs_through_it() -> None:
    home = Path(rlm_cli.__file__).parent
    for module in SERVING:
        source = (home / f"{module}.py").read_text()
        assert re.search(r"\b(loop|event_loop)\.run\(", source), module
        assert "asyncio.run(" not in source, module


def test_the_servers_run_uvloop_and_httptools() -> None:
    config = uvicorn_config(object(), host="127.0.0.1", port=0)
    assert config.loop == "uvloop"
    # The project's guarded protocol (a factory of it), over uvicorn's httptools protocol.
    protocol = getattr(config.http, "func", config.http)
    assert isinstance(protocol, type) and issubclass(protocol, HttpToolsProtocol)
