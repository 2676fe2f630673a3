"""Probes of the sandbox runtime's boundaries, as an attacker would try them, against a real
`rlm sandbox` process with real Pyodide sandboxes: huge results from guest code, result
frames forged by guest JavaScript on the sandbox's output pipe, hibernation past the memory
budget, a decompression-bomb snapshot, and requests without a token, for a foreign `Host`,
from a foreign `Origin`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from broker.redis_server import free_port
from sandbox_runtime.worker.blob import MAGIC

TOKEN = "bounds-probe-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OUTPUT_BYTES = 2**20  # the runtime's default per-execution output cap
MEMORY_BUDGET = 96 * 1024
DISK_BUDGET = 100 * 1024
BLOB_CAP = 256 * 1024
SNAPSHOT_CAP = 32 * 2**20


class RuntimeProcess:
    """`rlm sandbox` as a child process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rlm = Path(sys.executable).with_name("rlm")
        base = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [str(rlm), "sandbox", "--port", str(self.port)],
            env={**base, "RLM_LOG_LEVEL": "WARNING", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rlm sandbox exited with {self.process.returncode}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).json()["pool"]["idle"] >= 1:
                    return
            except (httpx2.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("rlm sandbox did not become ready")

    def peak_rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def spill_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spill")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, spill_dir: Path) -> Iterator[RuntimeProcess]:
    env = {
        "RLM_SANDBOX_TOKEN": TOKEN,
        "RLM_SANDBOX_POOL_SIZE": "1",
        "RLM_SANDBOX_MAX_CONCURRENT_SPAWNS": "2",
        "RLM_SANDBOX_HIBERNATE_AFTER_S": "0",
        "RLM_SANDBOX_HIBERNATION_DIR": str(spill_dir),
        "RLM_SANDBOX_HIBERNATION_MEMORY_BYTES": str(MEMORY_BUDGET),
        "RLM_SANDBOX_HIBERNATION_DISK_BYTES": str(DISK_BUDGET),
        "RLM_SANDBOX_HIBERNATION_MAX_BLOB_BYTES": str(BLOB_CAP),
        "RLM_SANDBOX_MAX_SNAPSHOT_BYTES": str(SNAPSHOT_CAP),
    }
    server = RuntimeProcess(env, tmp_path_factory.mktemp("runtime") / "runtime.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(runtime: RuntimeProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=runtime.url, headers=AUTH, timeout=120) as client:
        yield client


def new_session(http: httpx2.Client) -> str:
    response = http.post("/sessions", json={})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


def execute(http: httpx2.Client, session_id: str, code: str) -> tuple[dict[str, Any], int]:
    """The execution result and the size of the response body."""
    response = http.post(f"/sessions/{session_id}/execute", json={"code": code})
    assert response.status_code == 200, response.text[:2000]
    result: dict[str, Any] = response.json()
    return result, len(response.content)


# --- results of guest code -------------------------------------------------------------------


def test_guest_code_cannot_return_a_huge_final_or_output(http: httpx2.Client) -> None:
    session = new_session(http)
    try:
        result, size = execute(http, session, 'print("y" * 50_000_000)\nFINAL("x" * 100_000_000)')
        assert result["final"] is None
        assert result["error"]["type"] == "OutputTooLarge"
        assert "FINAL answer is 100000000 bytes" in result["error"]["message"]
        assert len(result["stdout"].encode()) <= OUTPUT_BYTES + 100
        assert size < 2 * OUTPUT_BYTES
        # The session goes on: nothing was lost.
        result, _ = execute(http, session, 'FINAL("short")')
        assert result["final"]["value"] == "short"
        assert not result["state_lost"]
    finally:
        http.delete(f"/sessions/{session}")


# --- frames forged by guest JavaScript -------------------------------------------------------

# Guest Python reaches JavaScript (`pyodide.code.run_js`), and JavaScript reaches the output
# pipe the host writes frames on (its fd is in Deno.args): the frame below is written there
# as if it were the reply to the execution.
_FORGE = r"""
from pyodide.code import run_js
run_js(r'''
(() => {
  const config = JSON.parse(Deno.args[0]);
  const out = Deno.openSync(`/dev/fd/${config.fd_out}`, { write: true });
  const writeAll = (bytes) => {
    for (let sent = 0; sent < bytes.length; ) sent += out.writeSync(bytes.subarray(sent));
  };
  const head = new TextEncoder().encode(__HEAD__);
  const tail = new TextEncoder().encode(__TAIL__);
  const fill = __FILL__;
  const prefix = new Uint8Array(8);
  new DataView(prefix.buffer).setUint32(0, head.length + fill + tail.length, false);
  writeAll(prefix);
  writeAll(head);
  const chunk = new Uint8Array(1 << 20).fill(65);
  for (let left = fill; left > 0; left -= chunk.length) {
    writeAll(chunk.subarray(0, Math.min(left, chunk.length)));
  }
  writeAll(tail);
})()
''')
"""

_RESULT = {"op": "result", "stdout": "", "stderr": "", "memory_bytes": 0}


def forge(fields: dict[str, Any], filler_key: str | None = None, fill: int = 0) -> str:
    """Guest code writing a result frame: `fields`, with `fill` bytes of "A" as the string at
    the end of the header (the value of `filler_key`, written in 1 MiB chunks)."""
    header = json.dumps({**_RESULT, **fields})
    head, tail = header, ""
    if filler_key is not None:
        marker = f'"{filler_key}": ""'
        index = header.index(marker) + len(marker) - 1
        head, tail = header[:index], header[index:]
    return (
        _FORGE.replace("__HEAD__", json.dumps(head))
        .replace("__TAIL__", json.dumps(tail))
        .replace("__FILL__", str(fill))
    )


FORGED = {
    # A 100 MiB error message: over the frame header ceiling, refused on the frame's prefix.
    "error-message-100MiB": forge(
        {"error": {"type": "X", "message": ""}, "final": None, "state": None},
        "message",
        100 * 2**20,
    ),
    # Within the frame ceiling, over the execution's bounds.
    "final-5MB": forge(
        {"error": None, "state": None, "final": {"source": "FINAL", "value": ""}},
        "value",
        5_000_000,
    ),
    "state-20MB": forge({"error": None, "final": None, "state": {"k": ""}}, "k", 20_000_000),
    "error-type-10k": forge(
        {"error": {"type": "T" * 10_000, "message": "m"}, "final": None, "state": None}
    ),
    "final-not-text": forge({"error": None, "state": None, "final": {"value": 5}}),
}


@pytest.mark.parametrize("code", FORGED.values(), ids=FORGED.keys())
def test_a_forged_result_frame_ends_the_sandbox(http: httpx2.Client, code: str) -> None:
    session = new_session(http)
    try:
        execute(http, session, "x = 41")
        result, size = execute(http, session, code)
        assert result["error"]["type"] == "SandboxProtocolError", result["error"]
        assert result["state_lost"] is True
        assert result["final"] is None and result["state"] in (None, {})
        assert size < 64 * 1024
        # The session carries on in a fresh sandbox; the forger's variables are gone.
        result, _ = execute(http, session, "print(1 + 1)\nprint('x' in globals())")
        assert result["stdout"] == "2\nFalse\n"
        assert result["error"] is None
    finally:
        http.delete(f"/sessions/{session}")


# --- hibernation ------------------------------------------------------------------------------


def test_hibernation_spills_past_the_memory_budget_and_never_grows_past_its_caps(
    http: httpx2.Client, spill_dir: Path
) -> None:
    # Random bytes do not compress: each blob is about the size of the variable.
    sizes = {"in-memory": 60_000, "spilled": 60_000, "no-disk-left": 60_000, "too-big": 400_000}
    sessions = {name: new_session(http) for name in sizes}
    try:
        for name, size in sizes.items():
            execute(http, sessions[name], f"import os\nblob = os.urandom({size})")
        hibernated = {
            name: http.post(f"/sessions/{sid}/hibernate").json()["hibernated"]
            for name, sid in sessions.items()
        }
        assert hibernated == {
            "in-memory": True,
            "spilled": True,
            "no-disk-left": False,  # stays live: memory and disk budgets are taken
            "too-big": False,  # over the per-session cap
        }
        held = http.get("/health").json()["sessions"]
        in_memory = held["hibernated_bytes"] - held["hibernated_spilled_bytes"]
        assert 0 < in_memory <= MEMORY_BUDGET
        assert 0 < held["hibernated_spilled_bytes"] <= DISK_BUDGET
        [directory] = spill_dir.glob("hibernation-*")
        assert directory.stat().st_mode & 0o777 == 0o700
        [spilled] = directory.iterdir()
        assert spilled.stat().st_mode & 0o777 == 0o600
        # Every session still has its variable, hibernated or not.
        for name, size in sizes.items():
            result, _ = execute(http, sessions[name], "print(len(blob))")
            assert result["stdout"] == f"{size}\n", name
            assert not result["state_lost"]
    finally:
        for sid in sessions.values():
            http.delete(f"/sessions/{sid}")
    assert not list(directory.iterdir())


# --- stateless execution ------------------------------------------------------------------------


def _bomb(inflated: int) -> str:
    """A namespace blob of ~`inflated / 1000` bytes that inflates to `inflated` zero bytes."""
    deflate = zlib.compressobj(9)
    zeros = bytes(16 * 2**20)
    count = inflated // len(zeros)
    # Two parts are compressed, not all: after a full flush the compressor starts afresh, so
    # every further part is the same bytes as the second. The trailer's checksum is the
    # stream's own (of all `inflated` zeros): a valid stream, refused for its size alone.
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush()[:-4]  # the final block, without the checksum of two parts
    check = 1
    for _ in range(count):
        check = zlib.adler32(zeros, check)
    stream = first + again * (count - 1) + end + check.to_bytes(4, "big")
    return base64.b64encode(MAGIC + stream).decode()


def test_a_decompression_bomb_snapshot_is_refused_in_bounded_memory(
    http: httpx2.Client, runtime: RuntimeProcess
) -> None:
    bomb = _bomb(768 * 2**20)
    assert len(bomb) < 2 * 2**20
    peak_before = runtime.peak_rss_bytes()
    response = http.post("/execute", json={"code": "print(1)", "snapshot": bomb})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "snapshot_too_large"
    assert runtime.peak_rss_bytes() - peak_before < 128 * 2**20
    # A snapshot of real size still goes round.
    first = http.post("/execute", json={"code": "x = 6 * 7"}).json()
    again = http.post("/execute", json={"code": "print(x)", "snapshot": first["snapshot"]})
    assert again.status_code == 200, again.text
    assert again.json()["result"]["stdout"] == "42\n"


# --- who may call -------------------------------------------------------------------------------


def test_a_runtime_without_a_token_does_not_start(tmp_path: Path) -> None:
    server = RuntimeProcess({}, tmp_path / "runtime.log")
    try:
        returncode = server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Old behaviour: it serves anyone. Show it, then fail.
        open_call = httpx2.post(f"{server.url}/sessions", json={}, timeout=30)
        pytest.fail(f"started without a token; POST /sessions -> {open_call.status_code}")
    finally:
        server.stop()
    output = (tmp_path / "runtime.log").read_text()
    assert returncode == 1
    assert output.strip().splitlines() == [
        "Error: RLM_SANDBOX_TOKEN is required: the sandbox runtime always asks for a bearer "
        "token; set it to a random secret, e.g. python3 -c 'import secrets; "
        "print(secrets.token_urlsafe(32))'"
    ]


def test_a_foreign_host_is_refused(http: httpx2.Client) -> None:
    # DNS rebinding: a page on evil.example resolved to this machine calls the runtime.
    for path, method in (("/sessions", "POST"), ("/execute", "POST"), ("/sessions/x", "GET")):
        response = http.request(method, path, json={}, headers={"Host": "evil.example:8100"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "host_not_allowed"
    # Probes reach /health by pod IP; it holds nothing a rebinding could take.
    assert http.get("/health", headers={"Host": "10.1.2.3:8100"}).status_code == 200
    # The compose service name is answered by default.
    response = http.post("/sessions", json={}, headers={"Host": "sandbox:8100"})
    assert response.status_code == 201, response.text
    http.delete(f"/sessions/{response.json()['session_id']}")


def test_a_cross_origin_browser_request_is_refused(http: httpx2.Client) -> None:
    for origin in ("https://evil.example", "null", "http://127.0.0.1:3000"):
        response = http.post("/sessions", json={}, headers={"Origin": origin})
        assert response.status_code == 403, (origin, response.text)
        assert response.json()["error"]["code"] == "origin_not_allowed"
