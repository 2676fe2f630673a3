"""Probes from inside real Pyodide sandboxes, as hostile guest code would try them, against
the kernel's confinement below Deno (bwrap, seccomp, rlimits, the idle-CPU watch).

Each probe ran against the unconfined launcher (RLM_SANDBOX_CONFINEMENT=off) and failed
there: the guest changed a host file's mode and owner, saw the host's root, held 2 GiB of
ArrayBuffers and WebAssembly memories, and kept a Worker spinning after its cell returned.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rlm_wire.runtime_client import RuntimeClient
from sandbox_runtime.errors import SandboxCrashedError, SandboxStartError
from sandbox_runtime.service.layers import isolation_layers
from sandbox_runtime.service.runtime import Runtime
from sandbox_runtime.service.serve import BackgroundRuntime, check_prerequisites
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import SandboxProcess, WorkerSettings
from sandbox_runtime.worker.confinement import data_limit, libraries
from sandbox_runtime.worker.launcher import GUEST_DIR, JS_DIR, REPL_SCRIPT, confinement_support
from tests.sandbox_worker_helpers import SETTINGS, ok, run

pytestmark = pytest.mark.anyio
SMALL = 64 * 2**20


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def pyodide_copy() -> Iterator[Path]:
    """A private copy of Pyodide for the sandboxes to run, in a directory the sandbox's own
    uid may traverse: what the guest tampers with is this copy, never the project's."""
    base = Path(tempfile.mkdtemp(prefix="rlm-confinement-", dir="/var/tmp"))
    base.chmod(0o755)
    copy = base / "pyodide"
    shutil.copytree(SETTINGS.pyodide_dir, copy, symlinks=False)
    yield copy
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def settings(pyodide_copy: Path) -> WorkerSettings:
    # Its own cache directory: the copy makes a snapshot of its own, which would otherwise be
    # left among the project's (and count against what the cache directory keeps).
    return SETTINGS.model_copy(
        update={
            "pyodide_dir": pyodide_copy,
            "cache_dir": pyodide_copy.parent / "cache",
            "idle_cpu_check_s": 0.5,
            "idle_cpu_strikes": 3,
        }
    )


@pytest.fixture
async def sandbox(settings: WorkerSettings) -> AsyncIterator[SandboxProcess]:
    process = await SandboxProcess.spawn(settings)
    yield process
    await process.kill()


def _js(source: str) -> str:
    """Guest Python running `source` in the JavaScript realm Pyodide lives in."""
    return f"from pyodide.code import run_js\nprint(run_js({source!r}))"


async def test_guest_cannot_change_modes_or_owners_of_the_code_every_sandbox_runs(
    settings: WorkerSettings, sandbox: SandboxProcess
) -> None:
    # The code every later sandbox loads: made world-writable, a guest could plant its own.
    victim = settings.pyodide_dir / "pyodide.asm.mjs"
    before = victim.stat()
    attack = (
        "const fs = process.getBuiltinModule('node:fs');"
        f"const fd = fs.openSync({str(victim)!r}, 'r');"
        "const tries = [['chmod777', () => fs.fchmodSync(fd, 0o777)],"
        " ['chown', () => fs.fchownSync(fd, 4242, 4242)],"
        " ['chmod000', () => fs.fchmodSync(fd, 0)]];"
        "const out = tries.map(([name, f]) => { try { f(); return name + ':done'; }"
        " catch (e) { return name + ':' + (e.code || e.name); } });"
        "fs.closeSync(fd); out.join(' ')"
    )
    try:
        result = await run(sandbox, _js(attack))
        after = victim.stat()
        assert (after.st_mode, after.st_uid, after.st_gid) == (
            before.st_mode,
            before.st_uid,
            before.st_gid,
        ), result.stdout
        assert "done" not in result.stdout, result.stdout
    finally:  # on a vulnerable build, leave the copy as it was for the next probe
        os.chmod(victim, stat.S_IMODE(before.st_mode))
        os.chown(victim, before.st_uid, before.st_gid)
    # A new sandbox still starts from the same files and runs code.
    fresh = await SandboxProcess.spawn(settings)
    try:
        assert await ok(fresh, "print(6 * 7)") == "42\n"
    finally:
        await fresh.kill()


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (its parent may reap it a moment later)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _visible_tops(settings: WorkerSettings) -> set[str]:
    """The top-level names a sandbox's root may hold: its own /dev, /proc and /tmp, and the
    first component of every path bound into it."""
    bound = [settings.deno_path, *map(Path, libraries(str(settings.deno_path)))]
    bound += [settings.pyodide_dir, JS_DIR, GUEST_DIR, REPL_SCRIPT]
    return {"dev", "proc", "tmp"} | {path.parts[1] for path in bound}


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _assert_confined(pid: int, settings: WorkerSettings) -> None:
    """What the host sees of a sandbox process: namespaces, root, mounts, privileges."""
    # Its own namespaces: mounts, network, pids, ipc, hostname, users.
    for kind in ("mnt", "net", "pid", "ipc", "uts", "user"):
        assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    # Its root is not the host's: no /etc, no host files at all, nothing writable but /tmp.
    root = Path(f"/proc/{pid}/root")
    assert set(os.listdir(root)) <= _visible_tops(settings), os.listdir(root)
    assert not (root / "etc" / "hostname").exists()
    assert not (root / "etc" / "passwd").exists()
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        mount_point, options = line.split()[4], line.split()[5].split(",")
        if mount_point == "/tmp" or mount_point.startswith(("/proc", "/dev")):
            continue
        assert "ro" in options, line
    status = _status(pid)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is installed
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    if os.geteuid() == 0:  # its own uid, not root's
        assert 0 not in {int(uid) for uid in status["Uid"].split()}


async def test_the_sandbox_sees_no_host_path_and_holds_no_privilege(
    settings: WorkerSettings, sandbox: SandboxProcess
) -> None:
    _assert_confined(sandbox.pid, settings)
    # From inside, by Deno's own calls and by the node-compat ones: the host is not there.
    for path in ("/etc/hostname", "/proc/1/environ", "/root/.bashrc"):
        probe = _js(
            "const fs = process.getBuiltinModule('node:fs');"
            f"try {{ fs.readFileSync({path!r}, 'utf8') }} catch (e) {{ 'refused ' + e.name }}"
        )
        assert (await ok(sandbox, probe)).startswith("refused"), path
    # chmod of a file it owns (its own output pipe, which Deno lets it open): refused by the
    # seccomp filter alone, whatever the file's permissions say.
    chmod_own_pipe = _js(
        "const fs = process.getBuiltinModule('node:fs');"
        "const fd = fs.openSync('/dev/fd/' + JSON.parse(Deno.args[0]).fd_out, 'w');"
        "try { fs.fchmodSync(fd, 0o600); 'changed' } catch (e) { e.code }"
    )
    assert await ok(sandbox, chmod_own_pipe) == "EPERM\n"


async def test_array_buffers_and_extra_wasm_memories_do_not_grow_the_process_unbounded(
    settings: WorkerSettings,
) -> None:
    limit = data_limit(settings, SMALL)
    grab = {
        "array buffers": "new ArrayBuffer(64 * 2**20)",
        "wasm memories": "new WebAssembly.Memory({initial: 1000}).buffer",
    }
    for name, make in grab.items():
        sandbox = await SandboxProcess.spawn(settings, memory_bytes=SMALL)
        try:
            hoard = (
                f"globalThis.hoard = []; for (let i = 0; i < 32; i++) {{ const b = {make};"
                " new Uint8Array(b).fill(7); hoard.push(b); } 'held ' + hoard.length"
            )
            result = await run(sandbox, _js(hoard))
            # 2 GiB held would be the boundary crossed; an error (or a lost sandbox) is the bound.
            assert result.error is not None, (name, result.stdout)
            # The result says which bound held, not `alive`: a process that died answers
            # state_lost before its exit is reaped (alive, with no /proc entry, for a moment).
            if not result.state_lost:
                assert 0 < sandbox.footprint() <= limit, name
                assert await ok(sandbox, "print('still here')") == "still here\n"
        finally:
            await sandbox.kill()


async def test_a_worker_left_spinning_by_a_cell_is_stopped(sandbox: SandboxProcess) -> None:
    started = await ok(
        sandbox,
        _js("new Worker('data:text/javascript,for(;;){}', {type: 'module'}); 'spinning'"),
    )
    assert started == "spinning\n"
    await _until_dead(sandbox)
    with pytest.raises(SandboxCrashedError, match="kept running"):
        await run(sandbox, "print(1)")


@pytest.mark.parametrize("names_its_request", [True, False])
async def test_a_forged_result_does_not_leave_the_sandbox_computing(
    sandbox: SandboxProcess, names_its_request: bool
) -> None:
    # The guest writes a result frame of its own on its output pipe, then keeps computing.
    # Naming the request (its number is easy to guess: requests are counted from 1), the
    # supervisor takes the execution as returned while the CPU stays busy, until the idle
    # watch ends it; without, the frame is refused at once and the sandbox ended.
    seq = f", seq: {sandbox._seq + 1}" if names_its_request else ""
    forge = (
        "const fs = process.getBuiltinModule('node:fs');"
        "const fd = fs.openSync('/dev/fd/' + JSON.parse(Deno.args[0]).fd_out, 'w');"
        "const header = new TextEncoder().encode(JSON.stringify({op: 'result',"
        f" stdout: 'forged', stderr: '', error: null, final: null, state: {{}}{seq}}}));"
        "const frame = new Uint8Array(8 + header.length);"
        "new DataView(frame.buffer).setUint32(0, header.length);"
        "frame.set(header, 8); fs.writeSync(fd, frame); 'sent'"
    )
    code = f"from pyodide.code import run_js\nrun_js({forge!r})\nwhile True:\n    pass"
    result = await run(sandbox, code)
    if names_its_request:
        assert result.stdout == "forged"
    else:
        assert result.error is not None
        assert result.error.type == "SandboxProtocolError"
        assert result.state_lost
    await _until_dead(sandbox)


async def _until_dead(sandbox: SandboxProcess) -> None:
    for _ in range(200):  # the idle watch samples every 0.5 s, 3 strikes, then kills
        if not sandbox.alive and not _running(sandbox.pid):
            break
        await asyncio.sleep(0.1)
    assert not sandbox.alive, "the sandbox kept computing after its execution returned"
    assert not _running(sandbox.pid)


async def test_without_bwrap_the_runtime_refuses_to_start_unless_told_to_run_with_less(
    tmp_path: Path,
) -> None:
    missing = SETTINGS.model_copy(update={"bwrap_path": tmp_path / "no-bwrap"})
    with pytest.raises(SandboxStartError, match="RLM_SANDBOX_ALLOW_WEAKER"):
        check_prerequisites(missing)
    with pytest.raises(SandboxStartError, match="RLM_SANDBOX_ALLOW_WEAKER"):
        Runtime(RuntimeSettings(port=0, pool_size=0, token="confinement-probe"), missing)
    with pytest.raises(SandboxStartError, match="RLM_SANDBOX_ALLOW_WEAKER"):
        await SandboxProcess.spawn(missing)
    # Asking for bwrap by name is never downgraded, consent or not.
    required = missing.model_copy(update={"confinement": "bwrap", "allow_weaker": True})
    with pytest.raises(SandboxStartError, match="CONFINEMENT=bwrap"):
        check_prerequisites(required)
    # With the explicit consent it starts, and says what it runs without.
    weaker = missing.model_copy(update={"allow_weaker": True})
    check_prerequisites(weaker)
    report = isolation_layers(weaker).as_dict()
    assert report["weaker_allowed"] is True
    for layer in ("confinement", "mount_namespace", "seccomp", "own_uid"):
        assert layer in report["missing"], layer


async def test_health_lists_the_layers_in_force() -> None:
    support = confinement_support(SETTINGS)
    settings = RuntimeSettings(port=0, pool_size=0, token="confinement-probe")
    with BackgroundRuntime(settings, SETTINGS) as runtime:
        async with RuntimeClient(runtime.url, "confinement-probe") as client:
            health = await client.health()
    layers = health["isolation"]["layers"]
    for name in (
        "deno_permissions",
        "confinement",
        "own_uid",
        "mount_namespace",
        "network_namespace",
        "pid_ipc_uts_namespaces",
        "no_new_privileges",
        "seccomp",
        "wasm_memory_bound",
        "memory_limit",
        "rlimits",
        "idle_cpu_watch",
    ):
        assert name in layers, name
    assert layers["confinement"]["active"] is (support.mode == "bwrap")
    assert layers["seccomp"]["active"] is (support.mode == "bwrap" and support.seccomp)
    assert health["isolation"]["weaker_allowed"] is support.weaker
