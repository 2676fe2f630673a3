"""Isolation probes from inside a real sandbox: host files, environment, JS host, network."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from broker.redis_server import free_port
from sandbox_runtime.worker import SandboxProcess
from sandbox_runtime.worker.launcher import c_library, network_namespace_available
from tests.sandbox_worker_helpers import SETTINGS, ok, run

pytestmark = pytest.mark.anyio
CANARY = "RLM_SANDBOX_TEST_CANARY"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "marker.txt"
    path.write_text("host secret")
    return path


@pytest.fixture(scope="module")
async def sandbox(anyio_backend: str) -> AsyncIterator[SandboxProcess]:
    os.environ[CANARY] = "canary-value"
    try:
        process = await SandboxProcess.spawn(SETTINGS)
    finally:
        del os.environ[CANARY]
    yield process
    await process.aclose()


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reached")

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()
    thread.join()


def _host_path_exists(path: str) -> bool:
    return Path(path).exists()


async def _fails(sandbox: SandboxProcess, code: str) -> str:
    result = await run(sandbox, code)
    assert result.error is not None, f"{code!r} succeeded: {result.stdout!r}"
    assert not result.state_lost
    return f"{result.error.type}: {result.error.message}"


async def test_host_files_are_not_readable(sandbox: SandboxProcess, marker: Path) -> None:
    error = await _fails(sandbox, f"open({str(marker)!r}).read()")
    assert error.startswith("FileNotFoundError")
    passwd = await ok(sandbox, "import os\nprint(os.path.exists('/etc/passwd'))")
    assert passwd == "False\n"
    error = await _fails(sandbox, f"import js\njs.Deno.readTextFileSync({str(marker)!r})")
    assert "NotCapable" in error
    error = await _fails(sandbox, "import js\njs.Deno.writeTextFileSync('/tmp/rlm_pwned', 'x')")
    assert "NotCapable" in error
    assert not _host_path_exists("/tmp/rlm_pwned")


async def test_no_host_environment(sandbox: SandboxProcess) -> None:
    env = await ok(sandbox, "import os\nprint(sorted(os.environ))")
    assert CANARY not in env
    assert "PATH" in env  # Pyodide's own defaults only
    assert "NotCapable" in await _fails(sandbox, "import js\njs.Deno.env.get('PATH')")
    assert "NotCapable" in await _fails(sandbox, "import js\njs.Deno.env.toObject()")
    assert "NotCapable" in await _fails(sandbox, "import js\njs.process.env.PATH")


async def test_no_way_out_through_the_javascript_realm(
    sandbox: SandboxProcess, marker: Path
) -> None:
    await ok(
        sandbox,
        "import pyodide_js\nrealm = pyodide_js.constructor.constructor('return globalThis')()",
    )
    assert (await ok(sandbox, "print(hasattr(realm, 'require'))")) == "False\n"
    for probe in (
        f"realm.Deno.readTextFileSync({str(marker)!r})",
        "realm.Deno.env.get('HOME')",
        "realm.Function(\"return new Deno.Command('/bin/sh', {args: ['-c', 'true']})"
        '.outputSync()")()',
        "realm.Deno.openSync('/etc/hostname')",
        "realm.Function(\"return Deno.dlopen('libc.so.6', {})\")()",
        'realm.Function("return Deno.listen({port: 0})")()',
    ):
        error = await _fails(sandbox, probe)
        assert "NotCapable" in error or "PermissionDenied" in error, (probe, error)


async def test_no_network(sandbox: SandboxProcess, http_port: int) -> None:
    url = f"http://127.0.0.1:{http_port}/probe"
    await run(
        sandbox,
        f"import pyodide_js\n"
        f"pyodide_js.constructor.constructor('return globalThis')().fetch({url!r})",
    )
    await run(sandbox, f"from pyodide.http import pyfetch\nfuture = pyfetch({url!r})")
    await run(sandbox, f"import js\njs.Deno.connect(hostname='127.0.0.1', port={http_port})")
    await _fails(sandbox, f"import socket\nsocket.create_connection(('127.0.0.1', {http_port}), 2)")
    await _fails(sandbox, f"import urllib.request\nurllib.request.urlopen({url!r}, timeout=2)")
    await ok(sandbox, "import time\ntime.sleep(0.3)")  # let any pending JS work run
    assert _Recorder.hits == []


#: A write, through ctypes, into the characters of a string every sandbox restored from the
#: snapshot (a page of the snapshot file that all sandboxes map), read back where it was made.
OVERWRITE_SHARED = """
import ctypes, string, sys
text = string.ascii_lowercase
ctypes.memmove(id(text) + sys.getsizeof(text) - len(text) - 1, b"Z" * len(text), len(text))
print(string.ascii_lowercase)
"""


async def test_a_write_to_the_shared_snapshot_stays_in_its_sandbox(
    anyio_backend: str, sandbox: SandboxProcess
) -> None:
    # Sandboxes map one snapshot file: a page one of them writes is copied into its own
    # memory first, so neither a sandbox running beside it nor one started after it sees it.
    attacker = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(attacker, OVERWRITE_SHARED) == "Z" * 26 + "\n"
        later = await SandboxProcess.spawn(SETTINGS)
        try:
            for other in (sandbox, later):
                read = "import string\nprint(string.ascii_lowercase)"
                assert await ok(other, read) == "abcdefghijklmnopqrstuvwxyz\n"
        finally:
            await later.kill()
    finally:
        await attacker.kill()


async def test_the_guest_cannot_open_a_native_library(sandbox: SandboxProcess) -> None:
    # The load maps the snapshot through the C library (FFI permission for it alone): that
    # permission is revoked before any guest code runs.
    libc = c_library(SETTINGS.deno_path)
    symbols = "{getpid: {parameters: [], result: 'i32'}}"
    probe = (
        "from pyodide.code import run_js\n"
        f"print(run_js(\"try {{ Deno.dlopen({libc!r}, {symbols}); 'opened' }}"
        " catch (e) { e.name }\"))"
    )
    assert await ok(sandbox, probe) == "NotCapable\n"


async def test_os_system_runs_nothing(anyio_backend: str, sandbox: SandboxProcess) -> None:
    # There are no processes in a sandbox: os.system fails (-1) and the session lives on.
    probe = "import os\nprint(os.system('touch /tmp/rlm_system_probe'))"
    assert await ok(sandbox, probe) == "-1\n"
    assert not _host_path_exists("/tmp/rlm_system_probe")
    assert await ok(sandbox, "1") == "1\n"


def _process_facts(pid: int) -> tuple[str, str, str]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return limits, os.readlink(f"/proc/{pid}/ns/net"), os.readlink("/proc/self/ns/net")


async def test_process_limits_and_network_namespace(sandbox: SandboxProcess) -> None:
    limits, sandbox_net, own_net = _process_facts(sandbox.pid)
    open_files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert open_files.split()[3:5] == [str(SETTINGS.max_open_files)] * 2
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    if network_namespace_available():
        assert sandbox_net != own_net


async def test_a_forged_reply_cannot_answer_a_later_request(anyio_backend: str) -> None:
    """Guest code can write frames through the host object it finds in its own process: here
    a reply of its own making, before the real one. Its own request may get what it forged
    (the code decides its own output anyway), but the real reply must not answer the next
    request: the supervisor sees the frame name the earlier request, and ends the sandbox
    rather than hand a caller a result that is not its call's."""
    forger = await SandboxProcess.spawn(SETTINGS)
    try:
        forged = await run(
            forger,
            "import json, rlm_guest.runtime as guest\n"
            "fields = {'stdout': 'forged\\n', 'stderr': '', 'error': None, 'final': None, "
            "'state': {}}\n"
            "guest.session().host.reply(json.dumps({'op': 'result', **fields}))\n"
            "print('real')",
        )
        assert forged.stdout == "forged\n"
        after = await run(forger, "print('next')")
        assert after.stdout != "real\n"  # the real reply of the request before, not this one's
        assert after.error is not None
        assert after.error.type == "SandboxProtocolError"
        assert after.state_lost
        assert not forger.alive
    finally:
        await forger.kill()


async def test_the_interrupt_file_is_private_read_only_and_leaves_no_name(
    sandbox: SandboxProcess,
) -> None:
    """The supervisor writes interrupts into a file of the sandbox's: its name is gone once the
    sandbox opened it (nothing is left in the host's temporary directory), and guest code can
    read it (a request number) but neither write it (to interrupt itself, or worse) nor
    remove it."""
    interrupts = sandbox._launched.interrupts
    assert not interrupts.path.exists()
    assert os.fstat(interrupts.fd).st_mode & 0o777 == 0o600  # no other user reads it
    probe = (
        "from pyodide.code import run_js\n"
        "import json\n"
        "path = json.loads(run_js('Deno.args[0]'))['interrupt_path']\n"
        "print(run_js(f\"try {{ Deno.writeFileSync({path!r}, new Uint8Array(4)); 'written' }}"
        " catch (e) {{ e.name }}\"))\n"
        "print(run_js(f\"try {{ Deno.removeSync({path!r}); 'removed' }} catch (e) {{ e.name }}\"))"
    )
    written, removed = (await ok(sandbox, probe)).split()
    assert written != "written"
    assert removed != "removed"
    assert await ok(sandbox, "print(1)") == "1\n"
