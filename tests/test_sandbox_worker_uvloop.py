"""Sandbox processes supervised from a uvloop loop (the runtime's default) leak no fds.

uvloop, unlike the stdlib loop, keeps the read pipe of a dead child open until its transport
is closed; every way a sandbox ends must close it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import uvloop

from sandbox_runtime.worker import SandboxProcess
from tests.sandbox_worker_helpers import OUTPUT, SETTINGS, ok

pytestmark = pytest.mark.anyio

SWALLOWS_INTERRUPTS = (
    "while True:\n    try:\n        while True: pass\n    except BaseException: pass"
)


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


def open_fds() -> int:
    return len(os.listdir(Path("/proc/self/fd")))


async def end_one(how: str) -> None:
    """Start a sandbox and end it in one of the ways a sandbox ends."""
    # The code run on a timeout swallows every interrupt, so it is killed after any grace:
    # a short one ends it the same way, sooner.
    settings = (
        SETTINGS.model_copy(update={"grace_s": 0.5}) if how == "ignored_timeout" else SETTINGS
    )
    process = await SandboxProcess.spawn(settings)
    if how == "kill":
        await ok(process, "x = 1")
        await process.kill()
    elif how == "kill_while_running":
        running = asyncio.ensure_future(
            process.execute("while True: pass", timeout_s=30, output_bytes=OUTPUT)
        )
        await asyncio.sleep(0.2)
        await process.kill()
        assert (await running).state_lost
    elif how == "ignored_timeout":
        result = await process.execute(SWALLOWS_INTERRUPTS, timeout_s=0.2, output_bytes=OUTPUT)
        assert result.state_lost
        assert not process.alive
    elif how == "killed_from_outside":
        os.kill(process.pid, signal.SIGKILL)
        result = await process.execute("x = 1", timeout_s=10, output_bytes=OUTPUT)
        assert result.state_lost
        await process.kill()
    elif how == "hibernate":
        await ok(process, "x = 1")
        assert await process.hibernate()
    else:
        raise AssertionError(how)


async def test_the_loop_is_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_ended_sandboxes_leave_no_open_fds() -> None:
    ways = ("kill", "kill_while_running", "ignored_timeout", "killed_from_outside", "hibernate")
    # The ways of one round run side by side (they are independent sandboxes; the count is
    # taken only once all have ended), so a round costs its slowest way, not their sum.
    # warm-up: the snapshot, lazily created loop resources
    await asyncio.gather(*(end_one(how) for how in ways))
    await asyncio.sleep(0.05)
    before = open_fds()
    rounds = 2
    for _ in range(rounds):
        await asyncio.gather(*(end_one(how) for how in ways))
    await asyncio.sleep(0.05)
    # One leaked fd per ended sandbox would add len(ways) * rounds; allow one of slack for
    # fds the loop opens and closes on its own. Two rounds: a single way that leaks one fd
    # per end adds two, still more than the slack.
    assert open_fds() <= before + 1
