"""`sandbox_runtime/js/snapshot_restore.mjs` under real Deno: the sparse copy of the memory
snapshot restores every byte, leaves nothing patched, and frees the snapshot's buffer.

The driver stands in for Pyodide's restore the way Pyodide does it (a fresh WebAssembly
memory sized to the snapshot, data written at instantiation, then one `HEAP8.set` of the
snapshot past its header); the real restore runs in every sandbox test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sandbox_runtime.worker import WorkerSettings
from sandbox_runtime.worker.launcher import JS_DIR

DRIVER = r"""
import { loadFromSnapshot } from "./snapshot_restore.mjs";

const PAGE = 4096, HEADER = 128, PAGES = 64;
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
const result = await loadFromSnapshot(fakeLoadPyodide, { indexURL: "/x/" }, snapshot);
let mismatches = 0;
for (let i = 0; i < PAGES * PAGE; i++) if ((heap[i] & 0xff) !== expected[i]) mismatches++;
for (let i = PAGES * PAGE; i < heap.length; i++) if (heap[i] !== 0) mismatches++;
console.log(JSON.stringify({
  same: result === heap,
  mismatches,
  seenPatched,
  otherCopyOk,
  stillPatched: Object.hasOwn(Int8Array.prototype, "set"),
  freed: snapshotBuffer.detached && snapshotBuffer.byteLength === 0,
}));
"""


def test_the_sparse_restore_copies_every_byte_and_frees_the_snapshot(tmp_path: Path) -> None:
    driver = tmp_path / "snapshot_restore_driver.mjs"
    driver.write_text(
        DRIVER.replace("./snapshot_restore.mjs", (JS_DIR / "snapshot_restore.mjs").as_uri())
    )
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
    assert json.loads(done.stdout) == {
        "same": True,
        "mismatches": 0,
        "seenPatched": True,
        "otherCopyOk": True,
        "stillPatched": False,
        "freed": True,
    }
