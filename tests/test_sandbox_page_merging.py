"""RLM_SANDBOX_MERGE_PAGES: sandboxes' identical pages kept once by the kernel (KSM).

Real Deno + Pyodide sandboxes under their real confinement; the kernel's own accounting
(`/proc/<pid>/ksm_stat`, `ksm_merging_pages`) says what was merged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_runtime.service.layers import isolation_layers
from sandbox_runtime.worker import SandboxProcess
from sandbox_runtime.worker.page_merging import KSM_DIR, status
from tests.sandbox_worker_helpers import SETTINGS, ok

pytestmark = pytest.mark.skipif(
    not status(True).supported, reason="this kernel has no PR_SET_MEMORY_MERGE (Linux 6.4+)"
)

MERGING = SETTINGS.model_copy(update={"merge_pages": True})


#: Both loops for the opt-in: the runtime runs on uvloop, whose subprocesses take the
#: preexec_fn too. The tests that start ksmd run once.
BOTH_LOOPS = pytest.mark.parametrize(
    "anyio_backend",
    [("asyncio", {}), ("asyncio", {"use_uvloop": True})],
    ids=["asyncio", "uvloop"],
)


def ksm_stat(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


async def merged_pages(pid: int, *, at_least: int) -> int:
    """Wait (bounded by the test's timeout) until ksmd merged `at_least` pages of `pid`."""
    while True:
        merged = int(ksm_stat(pid)["ksm_merging_pages"])
        if merged >= at_least:
            return merged
        await asyncio.sleep(0.2)


@pytest.fixture
def ksmd_running() -> Iterator[None]:
    """The machine's ksmd started for the test, then put back as it was: the runtime itself
    never changes it. 1,000 pages every 20 ms (~200 MB/s, ~0.4 of a core) merges two
    sandboxes in seconds; a faster pace takes a whole core from the tests running beside."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    before = {name: (KSM_DIR / name).read_text().strip() for name in names}
    try:
        (KSM_DIR / "pages_to_scan").write_text("1000")
        (KSM_DIR / "sleep_millisecs").write_text("20")
        (KSM_DIR / "run").write_text("1")
    except OSError as exc:  # not root: the test cannot start the kernel's thread
        pytest.fail(f"cannot start ksmd here: {exc}")
    try:
        yield
    finally:
        for name in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM_DIR / name).write_text(before[name])


@BOTH_LOOPS
@pytest.mark.parametrize("merge", [False, True])
async def test_the_setting_reaches_the_deno_process(merge: bool, anyio_backend: str) -> None:
    settings = SETTINGS.model_copy(update={"merge_pages": merge})
    process = await SandboxProcess.spawn(settings)
    try:
        # Deno runs under bwrap and setpriv: the opt-in survived their forks and execs.
        assert ksm_stat(process.pid)["ksm_merge_any:"] == ("yes" if merge else "no")
        assert await ok(process, "print(6 * 7)") == "42\n"
    finally:
        await process.kill()


async def test_two_sandboxes_share_their_identical_pages(
    ksmd_running: None, anyio_backend: str
) -> None:
    first = await SandboxProcess.spawn(MERGING)
    second = await SandboxProcess.spawn(MERGING)
    try:
        for process in (first, second):
            assert await ok(process, "data = list(range(100000)); print(len(data))") == "100000\n"
        # Both restored the same snapshot: tens of MiB alike. Each comes to hold at least
        # 8 MiB of merged pages.
        for process in (first, second):
            await merged_pages(process.pid, at_least=8 * 2**20 // 4096)
        # A merged page is copied again on write: the sessions still run, apart.
        assert await ok(first, "data[0] = 'first'; print(data[:2])") == "['first', 1]\n"
        assert await ok(second, "print(data[:2])") == "[0, 1]\n"
    finally:
        await first.kill()
        await second.kill()


async def test_an_unmerged_sandbox_is_left_alone(ksmd_running: None, anyio_backend: str) -> None:
    # Without the setting, ksmd never scans the sandbox, whatever others do.
    merging = await SandboxProcess.spawn(MERGING)
    plain = await SandboxProcess.spawn(SETTINGS)
    try:
        await merged_pages(merging.pid, at_least=1)
        assert ksm_stat(plain.pid)["ksm_merging_pages"] == "0"
        assert ksm_stat(plain.pid)["ksm_merge_any:"] == "no"
    finally:
        await merging.kill()
        await plain.kill()


def test_merging_is_reported_as_weaker_isolation() -> None:
    assert "no_page_merging" not in [layer.name for layer in isolation_layers(SETTINGS).missing]
    missing = {layer.name: layer for layer in isolation_layers(MERGING).missing}
    assert "side channel" in missing["no_page_merging"].detail


def test_status_reads_ksmd_state(tmp_path: Path) -> None:
    assert status(True, tmp_path).ksmd == "absent"
    (tmp_path / "run").write_text("0\n")
    assert status(True, tmp_path).ksmd == "stopped"
    assert not status(True, tmp_path).active
    (tmp_path / "run").write_text("1\n")
    assert status(True, tmp_path).active
    assert not status(False, tmp_path).active
