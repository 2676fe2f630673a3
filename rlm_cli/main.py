"""Entry point of the `rlm` console script.

Each component owns its subcommands in its own `cli.py` (a `commands` list of click
commands); this module only gathers them, so a component's imports load only when one of
its commands runs.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
from typing import Any

# No collections while `rlm` imports what every command needs (click, pydantic and its
# settings): ~70 of them, which find nothing to free. What the imports made is frozen, as
# `cli` freezes what a command's imports make: else the first collection once they are back
# on walks all of it (25-80 ms measured, load 2-4).
_collecting = gc.isenabled()
gc.disable()
try:
    import click

    from rlm_cli.logs import configure_logging
    from rlm_cli.settings import LOG_LEVELS, CliSettings, load_settings
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

# At exit the interpreter's last collections walk every object the imports made (the openai
# SDK's and pydantic's types: ~1 M objects); frozen, they are skipped, and `rlm ask` ends
# 0.5-0.7 s sooner on this project's machine. Only cyclic garbage left at exit goes
# unfinalized, which the process's end reclaims anyway.
atexit.register(gc.freeze)

# Modules that define a `commands: list[click.Command]`.
_COMMAND_MODULES = (
    "rlm_cli.commands",
    "rlm_cli.broker_commands",
    "rlm_cli.host_commands",
    "rlm_cli.sandbox_commands",
    "rlm_cli.serve_commands",
    "rlm_cli.session_commands",
    "rlm_cli.view_commands",
)

# Where each command is defined, so that running one imports only its own module: importing
# every module above costs ~2 s (the openai SDK, the sandbox runtime, Kubernetes helpers),
# more than `rlm ask` spends on anything else. tests/test_cli_startup.py keeps this complete.
COMMAND_HOMES = {
    "ask": "rlm_cli.ask",
    "broker": "rlm_cli.broker_commands",
    "config": "rlm_cli.commands",
    "demo": "rlm_cli.demo_cli",
    "fake-llm": "rlm_cli.host_commands",
    "poller": "rlm_cli.poller_commands",
    "sandbox": "rlm_cli.sandbox_commands",
    "serve": "rlm_cli.serve_commands",
    "session": "rlm_cli.session_commands",
    "tenant": "rlm_cli.broker_commands",
    "up": "rlm_cli.poller_commands",
    "usage": "rlm_cli.host_commands",
    "view": "rlm_cli.view_commands",
}


def _commands_of(module_name: str) -> dict[str, click.Command]:
    """The commands `module_name` defines; none when the module is not installed."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return {}
    return {c.name: c for c in getattr(module, "commands", []) if c.name}


class _LazyGroup(click.Group):
    """A group whose subcommands are looked up in the component modules on first use."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # No collections while the command's module is imported (click does it before the
        # group's callback): they would only walk the ~1 M objects the imports make, all
        # alive until exit, ~10 % of `rlm ask`'s import time. `cli` freezes them and turns
        # collections back on.
        gc.disable()
        try:
            return super().main(*args, **kwargs)
        finally:
            gc.enable()

    def _all_commands(self) -> dict[str, click.Command]:
        found: dict[str, click.Command] = {}
        for module_name in _COMMAND_MODULES:
            found.update(_commands_of(module_name))
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._all_commands())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        home = COMMAND_HOMES.get(cmd_name)
        command = _commands_of(home).get(cmd_name) if home is not None else None
        return command if command is not None else self._all_commands().get(cmd_name)


@click.group(cls=_LazyGroup)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Level of the logs on stderr [RLM_LOG_LEVEL; default: INFO for json, WARNING for "
    "console].",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    default=None,
    help="json: one JSON object a line; console: human-readable [RLM_LOG_FORMAT; default: "
    "console when stderr is a terminal, else json].",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """rlm-broker: run Recursive Language Models with sandboxed code and a Redis-backed broker."""
    # What the imports made stays in the permanent generation: collections from now on walk
    # only what the command makes (the few cycles left by the imports are kept, not freed).
    gc.freeze()
    gc.enable()
    settings = load_settings(CliSettings, log_level=log_level, log_format=log_format)
    ctx.obj = settings
    level, fmt = settings.log_output(terminal=sys.stderr.isatty())
    configure_logging(level=level, fmt=fmt)
