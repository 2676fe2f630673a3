"""`sandbox_runtime/js/pyodide_load.mjs`: Pyodide loaded without keeping memory the session
never uses.

Under real Deno with a driver that stands in for Pyodide's load the way Pyodide does it: it
instantiates its binary from a buffer it keeps, then (from a snapshot) restores into a fresh
WebAssembly memory sized to the snapshot, data written at instantiation, with one `HEAP8.set`
of the snapshot past its header. The sparse copy restores every byte, nothing is left patched,
and the snapshot's and the binary's buffers are freed. Then in a real sandbox: the Deno
process holds one copy of pyodide.asm.wasm's bytes (V8's own), not two, none of the standard
library's zip (read from the Pyodide directory as Python imports), and serves with V8's heap
collected down to its live size, the collector out of the guest's reach.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from sandbox_runtime.worker import SandboxProcess, WorkerSettings
from sandbox_runtime.worker.launcher import JS_DIR
from tests.sandbox_worker_helpers import SETTINGS, ok

DRIVER = r"""
import { loadPyodideLean } from "./pyodide_load.mjs";

const PAGE = 4096, HEADER = 128, PAGES = 64;
// The smallest WebAssembly module: Pyodide's binary stands in as a whole buffer of its own.
const binaryBytes = () => new Uint8Array([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0]);
const instantiate = WebAssembly.instantiate;
const load = { binaryFreed: false, laterBinaryKept: false, instantiated: false, options: null };

async function instantiateLikePyodide() {
  const binary = binaryBytes(); // kept, as Pyodide's instantiate function keeps its read
  const { instance } = await WebAssembly.instantiate(binary, {});
  load.instantiated = instance instanceof WebAssembly.Instance;
  load.binaryFreed = binary.buffer.detached && binary.byteLength === 0;
  const later = binaryBytes(); // a later module (a package's library) is left alone
  await WebAssembly.instantiate(later, {});
  load.laterBinaryKept = !later.buffer.detached && later.byteLength === 8;
}

const snapshot = new Uint8Array(HEADER + PAGES * PAGE);
const body = snapshot.subarray(HEADER);
for (let page = 0; page < PAGES; page++) {
  if (page % 3 === 0) continue; // a zero page
  body[page * PAGE + (page % 7) * 13] = page; // one non-zero byte somewhere in the page
}
body[PAGES * PAGE - 1] = 9;
const expected = body.slice(); // the snapshot's own buffer is emptied by the load
const snapshotBuffer = snapshot.buffer;
let heap = null;
let seenPatched = false;
let otherCopyOk = false;
async function fakeLoadPyodide(options) {
  load.options = Object.keys(options).sort();
  await instantiateLikePyodide();
  if (!options._loadSnapshot) return "fresh";
  const memory = new WebAssembly.Memory({ initial: 1 + (PAGES * PAGE) / 65536 });
  heap = new Int8Array(memory.buffer);
  // Data written at instantiation: non-zero where the snapshot has zero pages (0 and 3).
  heap[5] = 1;
  heap[3 * PAGE + 100] = 2;
  // Another copy during the load goes through the ordinary set.
  const other = new Int8Array(8);
  other.set(new Int8Array([1, 2, 3]), 2);
  otherCopyOk = other[2] === 1 && other[4] === 3;
  seenPatched = Object.hasOwn(Int8Array.prototype, "set");
  heap.set(options._loadSnapshot.subarray(HEADER));
  return heap;
}
const unpatched = () =>
  !Object.hasOwn(Int8Array.prototype, "set") && WebAssembly.instantiate === instantiate;

const fresh = await loadPyodideLean(fakeLoadPyodide, { indexURL: "/x/" }, null);
const withoutSnapshot = { result: fresh, ...load, patchedSet: seenPatched, unpatched: unpatched() };

const result = await loadPyodideLean(fakeLoadPyodide, { indexURL: "/x/" }, snapshot);
let mismatches = 0;
for (let i = 0; i < PAGES * PAGE; i++) if ((heap[i] & 0xff) !== expected[i]) mismatches++;
for (let i = PAGES * PAGE; i < heap.length; i++) if (heap[i] !== 0) mismatches++;
console.log(JSON.stringify({
  withoutSnapshot,
  fromSnapshot: {
    same: result === heap,
    mismatches,
    seenPatched,
    otherCopyOk,
    ...load,
    unpatched: unpatched(),
    snapshotFreed: snapshotBuffer.detached && snapshotBuffer.byteLength === 0,
  },
}));
"""


def test_the_load_frees_the_binary_and_the_snapshot_and_restores_every_byte(
    tmp_path: Path,
) -> None:
    driver = tmp_path / "pyodide_load_driver.mjs"
    driver.write_text(DRIVER.replace("./pyodide_load.mjs", (JS_DIR / "pyodide_load.mjs").as_uri()))
    deno = WorkerSettings().deno_path
    done = subprocess.run(
        [str(deno), "run", "--no-config", "--no-lock", f"--allow-read={JS_DIR}", str(driver)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "DENO_DIR": str(tmp_path / "deno"), "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    loaded = {"instantiated": True, "binaryFreed": True, "laterBinaryKept": True}
    assert json.loads(done.stdout) == {
        "withoutSnapshot": {
            "result": "fresh",
            **loaded,
            "options": ["indexURL"],
            "patchedSet": False,
            "unpatched": True,
        },
        "fromSnapshot": {
            "same": True,
            "mismatches": 0,
            "seenPatched": True,
            "otherCopyOk": True,
            **loaded,
            "options": ["_loadSnapshot", "indexURL"],
            "unpatched": True,
            "snapshotFreed": True,
        },
    }


def _copies(pid: int, needle: bytes) -> int:
    """How many times `needle` occurs in the resident memory `pid` can read and write."""
    found = 0
    with open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(bound, 16) for bound in span.split("-"))
            try:
                memory.seek(start)
                found += len(re.findall(re.escape(needle), memory.read(end - start)))
            except OSError:  # a guard page or a region unmapped meanwhile
                continue
    return found


def _needle(name: str) -> bytes:
    """64 bytes from the middle of one of Pyodide's files, found once in it."""
    content = (SETTINGS.pyodide_dir / name).read_bytes()
    middle = len(content) // 2
    needle = content[middle : middle + 64]
    assert content.count(needle) == 1
    return needle


async def _copies_in_a_sandbox(needle: bytes, code: str, printed: str) -> int:
    """How many copies of `needle` a new sandbox holds once it ran `code` (which printed)."""
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(process, code) == printed
        return _copies(process.pid, needle)
    finally:
        await process.kill()


async def test_a_sandbox_keeps_one_copy_of_the_pyodide_binary(anyio_backend: str) -> None:
    # Pyodide's own buffer of pyodide.asm.wasm (9.6 MB) stayed alive beside V8's copy: two
    # copies in every sandbox before. Only V8's is left.
    needle = _needle("pyodide.asm.wasm")
    assert await _copies_in_a_sandbox(needle, "print(sum(range(10)))", "45\n") == 1


#: V8's heap as the guest sees it: committed beyond what is live, in MiB, and whether the
#: collector (Deno runs with --expose-gc) is in reach.
HEAP = """
import js
usage = js.Deno.memoryUsage()
print(round((usage.heapTotal - usage.heapUsed) / 2**20, 1), getattr(js, "gc", None) is None)
"""


async def test_a_sandbox_serves_with_its_heap_collected(anyio_backend: str) -> None:
    # V8 kept the ~12 MiB its heap grew by while Pyodide loaded (its idle-time shrinking never
    # runs in a process blocked on its input): one collection before "ready" gives it back.
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        slack_mib, collector_hidden = (await ok(process, HEAP)).split()
        assert float(slack_mib) < 6.0, f"{slack_mib} MiB of V8 heap committed and not live"
        assert collector_hidden == "True"
    finally:
        await process.kill()


#: Modules the snapshot did not import: each is read from the standard library's zip now.
STDLIB_IMPORTS = """
import os, sys, difflib, xml.dom.minidom, email.mime.text
stdlib = next(entry for entry in sys.path if entry.endswith(".zip"))
print(os.path.realpath(stdlib).startswith("/rlm/pyodide/"),
      difflib.get_close_matches("appel", ["apple", "pear"]),
      xml.dom.minidom.parseString("<a><b/></a>").documentElement.tagName)
"""


async def test_a_sandbox_reads_the_standard_library_from_disk(anyio_backend: str) -> None:
    # Pyodide installed the 2.5 MB zip into each sandbox's memory; now the sandbox imports from
    # the Pyodide directory's file (read-only to it), and holds no copy.
    needle = _needle("python_stdlib.zip")
    assert await _copies_in_a_sandbox(needle, STDLIB_IMPORTS, "True ['apple'] a\n") == 0
