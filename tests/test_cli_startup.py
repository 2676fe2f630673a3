"""What keeps `rlm ask`'s start-up short: a command imports only its own module, and the
local stack starts the components that do not need each other at once."""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys

import click
import pytest

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
