"""`sandbox_runtime/js/pyodide_load.mjs`: Pyodide loaded without keeping memory the session
never uses.

Under real Deno with a driver that stands in for Pyodide's load the way Pyodide does it: it
instantiates its binary from a buffer it keeps, then (from a snapshot) restores into a fresh
WebAssembly memory sized to the snapshot, data written at instantiation, with one `HEAP8.set`
of the snapshot past its header. The sparse copy restores every byte, nothing is left patched,
and the snapshot's and the binary's buffers are freed. A small module with data segments:
V8 is given it with the segments emptied, the load writes them. A small module with a
function table: the slots its element section gives are those a scan of the table finds. A
real Pyodide: the snapshot's maker zeroes the allocator's free memory. Then in a real sandbox:
the Deno process holds one copy of pyodide.asm.wasm's code (V8's own), its data segments in
the instance's memory only, one copy of pyodide.asm.mjs's source, none of the standard
library's zip (read from the Pyodide directory as Python imports), no JavaScript function for
every slot of the table, and serves with V8's heap collected down to its live size, the
collector out of the guest's reach.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandbox_runtime.worker import SandboxProcess
from sandbox_runtime.worker.launcher import JS_DIR, c_library, sandbox_pid
from sandbox_runtime.worker.snapshot_memory import MAPPED_NAME_PREFIX, PAGE, snapshot_memory
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


def _run_driver(
    tmp_path: Path,
    driver: str,
    *arguments: str,
    permissions: tuple[str, ...] = (),
    pass_fds: tuple[int, ...] = (),
) -> Any:
    """Runs `driver` (JavaScript importing ./pyodide_load.mjs) under real Deno, allowed to read
    the scripts and Pyodide's directory (and `permissions` more); what it printed, as JSON."""
    script = tmp_path / "driver.mjs"
    script.write_text(driver.replace("./pyodide_load.mjs", (JS_DIR / "pyodide_load.mjs").as_uri()))
    done = subprocess.run(
        [
            str(SETTINGS.deno_path),
            "run",
            "--no-config",
            "--no-lock",
            f"--allow-read={JS_DIR},{SETTINGS.pyodide_dir.resolve()}",
            *permissions,
            str(script),
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        pass_fds=pass_fds,
        env={"PATH": "/usr/bin:/bin", "DENO_DIR": str(tmp_path / "deno"), "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_load_frees_the_binary_and_the_snapshot_and_restores_every_byte(
    tmp_path: Path,
) -> None:
    loaded = {"instantiated": True, "binaryFreed": True, "laterBinaryKept": True}
    assert _run_driver(tmp_path, DRIVER) == {
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


#: A snapshot of 48 pages: of the first 16, every third one zero, the others filled; the next
#: 24 zero (a hole the mapping leaves out); the last 8 filled.
MAPPED_PAGES = 48
MAPPED_DRIVER = r"""
import { loadPyodideLean, snapshotFromDescriptor } from "./pyodide_load.mjs";

const [fd, libc, misaligned] = [Number(Deno.args[0]), Deno.args[1], Deno.args[2] === "1"];
const PAGE = 4096, PAGES = 48;
const filled = (page) => (page < 16 && page % 3 !== 0) || page >= 40;
const expected = new Uint8Array(PAGES * PAGE);
for (let page = 0; page < PAGES; page++) {
  if (filled(page)) expected.fill((page * 7 + 1) % 256, page * PAGE, (page + 1) * PAGE);
}
const { snapshot, image } = snapshotFromDescriptor(fd, libc);
const header = [...snapshot.subarray(0, 8)];
let mapped = null; // what the restore answered: mapped (true) or read and copied (false)
const into = image.into;
image.into = (target, source) => (mapped = into(target, source));
let heap = null;
await loadPyodideLean(async (options) => {
  const memory = new WebAssembly.Memory({ initial: 4 });
  heap = new Uint8Array(memory.buffer);
  heap[3 * PAGE + 5] = 1; // written at instantiation where the snapshot has a zero page
  heap[20 * PAGE + 7] = 2; // and in its long hole
  const target = misaligned ? heap.subarray(8) : heap;
  new Int8Array(target.buffer, target.byteOffset).set(options._loadSnapshot.subarray(128));
}, { indexURL: "/x/" }, snapshot, image);
const restored = heap.subarray(misaligned ? 8 : 0, (misaligned ? 8 : 0) + PAGES * PAGE);
let mismatches = 0;
for (let i = 0; i < expected.length; i++) if (restored[i] !== expected[i]) mismatches++;
heap[PAGE] = 99; // copy-on-write: the file keeps its byte
let dlopen = "opened";
try {
  Deno.dlopen(libc, { getpid: { parameters: [], result: "i32" } });
} catch (error) {
  dlopen = error.name;
}
console.log(JSON.stringify({
  header,
  mismatches,
  mapped,
  dlopen,
  ffiGranted: Deno.permissions.querySync({ name: "ffi", path: libc }).state === "granted",
  snapshotFreed: snapshot.buffer.detached,
}));
"""


def _mapped_snapshot(tmp_path: Path) -> int:
    """The sealed memory file of a snapshot of `MAPPED_PAGES` pages (as MAPPED_DRIVER expects)."""
    header = bytearray(128)
    header[0:8] = struct.pack("<II", 0x5AFE, 128)
    def filled(page: int) -> bool:
        return (page < 16 and page % 3 != 0) or page >= 40

    image = b"".join(
        bytes([(page * 7 + 1) % 256 if filled(page) else 0]) * PAGE for page in range(MAPPED_PAGES)
    )
    path = tmp_path / "pyodide-0.1.0-cccccccccccccccc.snapshot"
    path.write_bytes(bytes(header) + image)
    return snapshot_memory(path)


@pytest.mark.parametrize("misaligned", [False, True])
def test_the_snapshot_is_mapped_from_its_memory_file_and_ffi_revoked(
    tmp_path: Path, misaligned: bool
) -> None:
    # The image is mapped over the WebAssembly memory (or, where a mapping cannot be made,
    # read and copied): every byte as the snapshot has it, pages written at instantiation
    # restored too; then the FFI permission that made it possible is gone.
    libc = c_library(SETTINGS.deno_path)
    assert libc is not None
    fd = _mapped_snapshot(tmp_path)
    try:
        got = _run_driver(
            tmp_path,
            MAPPED_DRIVER,
            str(fd),
            libc,
            "1" if misaligned else "0",
            permissions=(f"--allow-ffi={libc}",),
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    assert got == {
        "header": [0xFE, 0x5A, 0, 0, 128, 0, 0, 0],
        "mismatches": 0,
        "mapped": not misaligned,
        "dlopen": "NotCapable",
        "ffiGranted": False,
        "snapshotFreed": True,
    }


def _leb(value: int, signed: bool = False) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if signed:
            done = (value == 0 and not byte & 0x40) or (value == -1 and bool(byte & 0x40))
        else:
            done = value == 0
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + _leb(len(body)) + body


def _wasm(*sections: bytes) -> bytes:
    return b"\0asm\1\0\0\0" + b"".join(sections)


#: One page of memory, exported as "memory".
MEMORY = _section(5, b"\x01\x00\x01") + _section(7, b"\x01\x06memory\x02\x00")


def _active(offset: int, data: bytes) -> bytes:
    return b"\x00\x41" + _leb(offset, signed=True) + b"\x0b" + _leb(len(data)) + data


#: Three active segments, the second overlapping the first (the later one wins), the third
#: with an offset and a length of several LEB bytes.
SEGMENTS = [(16, b"hello, wasm data"), (20, b"XYZ"), (40000, bytes(range(256)) * 2)]
WITH_DATA, EMPTIED = (
    _wasm(
        MEMORY,
        _section(12, _leb(len(SEGMENTS))),  # the data count (bulk memory)
        _section(11, _leb(len(SEGMENTS)) + b"".join(_active(at, keep(d)) for at, d in SEGMENTS)),
    )
    for keep in (lambda data: data, lambda data: b"")
)
#: Kept as they are: a passive segment; a start function (it would run before the segments
#: are written).
PASSIVE = _wasm(MEMORY, _section(11, b"\x01\x01\x03abc"))
WITH_START = _wasm(
    _section(1, b"\x01\x60\x00\x00"),
    _section(3, b"\x01\x00"),
    MEMORY,
    _section(8, b"\x00"),
    _section(10, b"\x01\x02\x00\x0b"),
    _section(11, b"\x01" + _active(0, b"abc")),
)

SPLIT_DRIVER = r"""
import { loadPyodideLean, splitDataSegments } from "./pyodide_load.mjs";

const fromHex = (hex) => Uint8Array.from(hex.match(/../g), (pair) => parseInt(pair, 16));
const [withData, passive, withStart] = Deno.args.map(fromHex);
const memoryOf = (instance) => new Uint8Array(instance.exports.memory.buffer);
const expected = memoryOf((await WebAssembly.instantiate(withData.slice(), {})).instance).slice();

const split = splitDataSegments(withData);
const emptied = memoryOf((await WebAssembly.instantiate(split.module, {})).instance);

// Through the load, as Pyodide instantiates its binary (a buffer of its own, whole).
const binary = withData.slice();
let loaded = null;
await loadPyodideLean(async () => {
  const { instance } = await WebAssembly.instantiate(binary, {});
  loaded = memoryOf(instance);
}, { indexURL: "/x/" }, null);
const same = loaded.length === expected.length && loaded.every((byte, i) => byte === expected[i]);

console.log(JSON.stringify({
  valid: WebAssembly.validate(split.module),
  module: [...split.module].map((byte) => byte.toString(16).padStart(2, "0")).join(""),
  // [offset, length] of each (the flat array holds offset, start, length)
  segments: Array.from({ length: split.segments.length / 3 }, (_, i) => i * 3)
    .map((at) => [split.segments[at], split.segments[at + 2]]),
  emptiedIsZero: emptied.every((byte) => byte === 0),
  loadedSame: same,
  written: [...loaded.subarray(16, 32)].map((c) => String.fromCharCode(c)).join(""),
  binaryFreed: binary.buffer.detached,
  passive: splitDataSegments(passive),
  withStart: splitDataSegments(withStart),
}));
"""


def test_data_segments_are_written_by_the_load_and_left_out_of_v8s_copy(tmp_path: Path) -> None:
    # V8 keeps the bytes of a module it compiled, data segments included (3.3 of Pyodide's
    # 9.6 MB), though an instance reads them once: the load gives it the binary with its
    # segments emptied and writes them into the new instance's memory itself.
    got = _run_driver(tmp_path, SPLIT_DRIVER, WITH_DATA.hex(), PASSIVE.hex(), WITH_START.hex())
    assert got == {
        "valid": True,
        "module": EMPTIED.hex(),
        "segments": [[at, len(data)] for at, data in SEGMENTS],
        "emptiedIsZero": True,
        "loadedSame": True,
        "written": "hellXYZwasm data",
        "binaryFreed": True,
        "passive": None,
        "withStart": None,
    }


#: 200 functions of one type; a table of 300 slots, exported with functions 3 and 5; two
#: element segments: slots 1.. hold functions 0-149 then 5, 7, 5 (a function in several slots:
#: a scan in order finds its last), slots 200.. (an offset of two LEB bytes) hold 150-199
#: then 5 again.
FUNCTIONS = 200
FIRST = [*range(150), 5, 7, 5]
SECOND = [*range(150, 200), 5]
WITH_TABLE = _wasm(
    _section(1, b"\x01\x60\x00\x00"),
    _section(3, _leb(FUNCTIONS) + b"\x00" * FUNCTIONS),
    _section(4, b"\x01\x70\x00" + _leb(300)),
    _section(7, b"\x03\x05table\x01\x00\x05three\x00\x03\x04five\x00\x05"),
    _section(
        9,
        b"\x02"
        + b"".join(
            b"\x00\x41" + _leb(offset, signed=True) + b"\x0b" + _leb(len(functions))
            + b"".join(_leb(index) for index in functions)
            for offset, functions in ((1, FIRST), (200, SECOND))
        ),
    ),
    _section(10, _leb(FUNCTIONS) + b"\x02\x00\x0b" * FUNCTIONS),
)  # fmt: skip
#: A passive element segment: its functions have no slot until code puts them in one.
PASSIVE_ELEMENTS = _wasm(
    _section(1, b"\x01\x60\x00\x00"),
    _section(3, b"\x01\x00"),
    _section(9, b"\x01\x01\x00\x01\x00"),
    _section(10, b"\x01\x02\x00\x0b"),
)

TABLE_DRIVER = r"""
import { elementSlots, MainTableSlots } from "./pyodide_load.mjs";

const fromHex = (hex) => Uint8Array.from(hex.match(/../g), (pair) => parseInt(pair, 16));
const [withTable, passive] = Deno.args.map(fromHex);
const { instance } = await WebAssembly.instantiate(withTable.slice(), {});
const { table, three, five } = instance.exports;
// What Emscripten's first lookup did: every slot read, in order, the last one winning.
const scanned = {};
for (let slot = 0; slot < table.length; slot++) {
  const func = table.get(slot);
  if (func) scanned[func.name] = slot;
}
const slots = elementSlots(withTable);
const fromSection = {};
slots.forEach((slot, index) => { if (slot >= 0) fromSection[index] = slot; });

const tableSlots = new MainTableSlots();
const reads = [];
const entry = (slot) => { reads.push(slot); return table.get(slot); };
const map = new WeakMap();
const unknown = tableSlots.find(five, entry, map); // before the binary is learnt
tableSlots.learn(withTable);
const other = (await WebAssembly.instantiate(withTable.slice(), {})).instance.exports.five;
console.log(JSON.stringify({
  sameAsScan: JSON.stringify(fromSection) === JSON.stringify(scanned),
  slotsOfFive: [scanned[5], fromSection[5]],
  unknown,
  five: tableSlots.find(five, entry, map),
  three: tableSlots.find(three, entry, map),
  recorded: [map.get(five), map.get(three)],
  reads,
  sameIndexOtherModule: tableSlots.find(other, entry, map),
  javascript: tableSlots.find(function five() {}, entry, map),
  passive: elementSlots(passive),
  noElements: elementSlots(new Uint8Array([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0])),
}));
"""


def test_the_table_slots_of_the_binarys_functions_are_read_from_its_element_section(
    tmp_path: Path,
) -> None:
    # Emscripten's loader read every slot of the function table at its first lookup (a
    # JavaScript function made and kept per slot, 2.2 MiB of V8's heap for Pyodide's): the
    # element section gives the same slots, and a lookup reads the one slot it checks.
    got = _run_driver(tmp_path, TABLE_DRIVER, WITH_TABLE.hex(), PASSIVE_ELEMENTS.hex())
    assert got == {
        "sameAsScan": True,
        "slotsOfFive": [200 + len(SECOND) - 1] * 2,
        "unknown": 0,
        "five": 200 + len(SECOND) - 1,
        "three": 1 + 3,
        "recorded": [200 + len(SECOND) - 1, 1 + 3],
        "reads": [200 + len(SECOND) - 1, 1 + 3, 200 + len(SECOND) - 1],
        "sameIndexOtherModule": 0,
        "javascript": 0,
        "passive": None,
        "noElements": None,
    }


ZERO_DRIVER = r"""
import { zeroFreeMemory } from "./pyodide_load.mjs";

const dir = Deno.args[0];
const { loadPyodide } = await import(new URL(`file://${dir}/pyodide.mjs`).href);
const pyodide = await loadPyodide({ indexURL: `${dir}/`, stdout: () => {}, stderr: () => {} });
const module = pyodide._module;
// Garbage: blocks written with 0xAB, then freed.
const blocks = [];
for (let i = 0; i < 200; i++) {
  const size = 64 + ((i * 977) % 6000);
  const pointer = module._malloc(size);
  module.HEAPU8.fill(0xab, pointer, pointer + size);
  blocks.push([pointer, size]);
}
for (let i = 0; i < blocks.length; i += 2) module._free(blocks[i][0]); // every other one
const countGarbage = () => {
  let words = 0;
  const heap = new Uint32Array(module.HEAPU8.buffer);
  for (let i = 0; i < blocks.length; i += 2) {
    const [pointer, size] = blocks[i];
    for (let at = Math.ceil(pointer / 4); at < (pointer + size) / 4 - 1; at++) {
      if (heap[at] === 0xabababab) words++;
    }
  }
  return words;
};
const before = countGarbage();
const memoryBefore = module.HEAPU8.length;
const zeroed = zeroFreeMemory(module);
let liveKept = true;
for (let i = 1; i < blocks.length; i += 2) {
  const [pointer, size] = blocks[i];
  const block = module.HEAPU8.subarray(pointer, pointer + size);
  if (!block.every((byte) => byte === 0xab)) liveKept = false;
}
console.log(JSON.stringify({
  garbageBefore: before > 0,
  garbageAfter: countGarbage(),
  zeroedSome: zeroed > 0,
  liveKept,
  memoryGrew: module.HEAPU8.length !== memoryBefore,
  stillRuns: pyodide.runPython("sum(range(10))"),
  withoutAllocatorExports: zeroFreeMemory({ HEAPU8: new Uint8Array(16) }),
}));
"""


def test_the_snapshots_maker_zeroes_the_allocators_free_memory(tmp_path: Path) -> None:
    # What the interpreter freed while starting was left as garbage in the snapshot, restored
    # into every sandbox like live data (1.6 of its 15.9 MiB of non-zero pages).
    got = _run_driver(tmp_path, ZERO_DRIVER, str(SETTINGS.pyodide_dir.resolve()))
    assert got == {
        "garbageBefore": True,
        "garbageAfter": 0,
        "zeroedSome": True,
        "liveKept": True,
        "memoryGrew": False,
        "stillRuns": 45,
        "withoutAllocatorExports": 0,  # nothing done
    }


def _copies_by_region(pid: int, needle: bytes) -> dict[int, int]:
    """Where `needle` occurs in the resident memory `pid` can read and write: how many times
    in each region that holds it (a run of adjacent read-write mappings, by its start: the
    WebAssembly memory is one, made of the snapshot file's mapped ranges and what lies
    between them)."""
    found: dict[int, int] = {}
    region = end = -1
    with open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, stop = (int(bound, 16) for bound in span.split("-"))
            region = region if start == end else start
            end = stop
            try:
                memory.seek(start)
                count = len(re.findall(re.escape(needle), memory.read(stop - start)))
            except OSError:  # a guard page or a region unmapped meanwhile
                continue
            if count:
                found[region] = found.get(region, 0) + count
    return found


def _copies(pid: int, needle: bytes) -> int:
    """How many times `needle` occurs in the resident memory `pid` can read and write."""
    return sum(_copies_by_region(pid, needle).values())


def _needle(name: str, at: float = 0.5) -> bytes:
    """64 bytes of one of Pyodide's files, found once in it, from `at` (a fraction of its
    length) on."""
    content = (SETTINGS.pyodide_dir / name).read_bytes()
    for start in range(int(len(content) * at), len(content) - 64, 64):
        needle = content[start : start + 64]
        if content.count(needle) == 1:
            return needle
    raise AssertionError(f"no 64 bytes of {name} past {at:.0%} are unique")


async def _copies_in_a_sandbox(needle: bytes, code: str, printed: str) -> int:
    """How many copies of `needle` a new sandbox holds once it ran `code` (which printed)."""
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(process, code) == printed
        return _copies(process.pid, needle)
    finally:
        await process.kill()


async def test_a_sandbox_keeps_one_copy_of_pyodides_binary_data_and_javascript(
    anyio_backend: str,
) -> None:
    # Pyodide's own buffer of pyodide.asm.wasm (9.6 MB) stayed alive beside V8's copy: two
    # copies of its code in every sandbox before, only V8's now. Its data segments (from 65 %
    # of the file on) were kept by V8 besides the instance's memory: only the memory holds
    # them now (where Python may copy some, e.g. a docstring, hence regions, not copies). And
    # pyodide.asm.mjs's source was held by Deno's module loader and by V8: only by V8 now.
    code, javascript = _needle("pyodide.asm.wasm", at=0.3), _needle("pyodide.asm.mjs")
    data = [_needle("pyodide.asm.wasm", at) for at in (0.7, 0.8, 0.9)]
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(process, "print(sum(range(10)))") == "45\n"
        assert _copies(process.pid, code) == 1
        assert _copies(process.pid, javascript) == 1
        assert [len(_copies_by_region(process.pid, needle)) for needle in data] == [1, 1, 1]
    finally:
        await process.kill()


def _initial_table_slots() -> int:
    """The size of pyodide.asm.wasm's function table when it is instantiated (its table
    section: the first table's minimum)."""
    content = (SETTINGS.pyodide_dir / "pyodide.asm.wasm").read_bytes()

    def leb(at: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = content[at]
            value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
            if not byte & 0x80:
                return value, at

    at = 8
    while at < len(content):
        size, body = leb(at + 1)
        if content[at] == 4:  # the table section: count, then reftype, limits flags, minimum
            _, first = leb(body)
            return leb(first + 2)[0]
        at = body + size
    raise AssertionError("no table section")


#: dlsym into the main module (ctypes.pythonapi), and the function table's size.
TABLE = """
import ctypes, pyodide_js
from_long = ctypes.pythonapi.PyLong_FromLong
from_long.restype, from_long.argtypes = ctypes.py_object, [ctypes.c_long]
print(from_long(41) + 1, pyodide_js._module.wasmTable.length)
"""


async def test_the_start_gives_no_table_slot_to_every_export(anyio_backend: str) -> None:
    # Emscripten's loader gave each of the main module's 7,415 exported functions a table slot
    # and a GOT entry at every start, for side modules the sandbox never loads: 5,400 more
    # slots than the binary's table, and 1.4 MiB of V8's heap. Symbols are still found.
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        answer, slots = (await ok(process, TABLE)).split()
    finally:
        await process.kill()
    assert answer == "42"
    assert int(slots) - _initial_table_slots() < 1000, slots


#: dlsym of a function the binary's element section put in the table (its slot, and how many
#: slots the table gained), then every slot of the table read from JavaScript: how much V8's
#: heap grew, in MiB (a JavaScript function is made for each slot read the first time).
TABLE_VIEW = """
import ctypes, pyodide_js
from pyodide.code import run_js
table = pyodide_js._module.wasmTable
before = table.length
address = ctypes.cast(ctypes.pythonapi.PyObject_GenericGetAttr, ctypes.c_void_p).value
grown = table.length - before
read_every_slot = run_js('''(table) => {
  const heapUsed = () => Deno.memoryUsage().heapUsed;
  const before = heapUsed();
  const held = [];
  for (let slot = 0; slot < table.length; slot++) held.push(table.get(slot));
  return (heapUsed() - before) / 1048576;
}''')
print(address, grown, round(read_every_slot(table), 1))
"""


async def test_the_start_makes_no_javascript_function_for_every_table_slot(
    anyio_backend: str,
) -> None:
    # Emscripten's first lookup of a function's slot read the whole table: 8,732 JavaScript
    # functions made and kept in every sandbox. Lookups read one slot now, and find the same:
    # dlsym gives a function of the binary its own slot, adding none.
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        address, grown, heap_growth_mib = (await ok(process, TABLE_VIEW)).split()
    finally:
        await process.kill()
    assert 0 < int(address) < _initial_table_slots()
    assert grown == "0"
    assert float(heap_growth_mib) > 1.0, "the table's functions were made before"


def _snapshot_mapping_kib(pid: int) -> tuple[int, int]:
    """(Rss, Shared) in KiB of a sandbox's mappings of the snapshot's memory file (shared:
    pages other processes map too; a memory file's pages count as dirty)."""
    rss = shared = 0
    inside = False
    for line in Path(f"/proc/{sandbox_pid(pid)}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            inside = MAPPED_NAME_PREFIX in line
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1])
        elif inside and fields[0] in ("Shared_Clean:", "Shared_Dirty:"):
            shared += int(fields[1])
    return rss, shared


def _deno_argv(pid: int) -> list[str]:
    return Path(f"/proc/{sandbox_pid(pid)}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.parametrize("mapped", [True, False])
async def test_sandboxes_share_the_pages_of_the_snapshot_they_did_not_write(
    mapped: bool, anyio_backend: str
) -> None:
    # Each sandbox copied the snapshot's image into its own memory; now each maps the one
    # sealed memory file, copy-on-write: what their sessions did not write is one copy for
    # both. With RLM_SANDBOX_MAP_SNAPSHOT off, no FFI permission is given and it is copied.
    settings = SETTINGS.model_copy(update={"map_snapshot": mapped})
    processes = [await SandboxProcess.spawn(settings) for _ in range(2)]
    try:
        for process in processes:
            assert await ok(process, "rows = [str(i) for i in range(50000)]; print(len(rows))") == (
                "50000\n"
            )
        for process in processes:
            assert process.snapshot_restore == ("mapped" if mapped else "piped")
            rss, shared = _snapshot_mapping_kib(process.pid)
            if mapped:
                assert rss > 4096 and shared > 4096, (rss, shared)  # KiB
            else:
                assert rss == 0
            ffi = [arg for arg in _deno_argv(process.pid) if "-ffi" in arg]
            assert ffi == (
                [f"--allow-ffi={c_library(settings.deno_path)}"] if mapped else ["--deny-ffi"]
            )
    finally:
        for process in processes:
            await process.kill()


#: How many packages Pyodide's lock file told the sandbox of.
PACKAGES = """
import pyodide_js
print(len(pyodide_js._api.lockfile_packages.to_py()))
"""


async def test_the_sandbox_is_given_a_lock_file_without_packages(anyio_backend: str) -> None:
    # Pyodide kept its lock file's 357 packages in JavaScript (and their import names in
    # Python), though a sandbox can load none: only Pyodide's core files are installed and
    # it has no network. It is given the lock file with no package in it.
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(process, PACKAGES) == "0\n"
    finally:
        await process.kill()


#: What the snapshot holds: how many objects it froze, and which of the modules only
#: hibernation and other environments use a new sandbox has imported.
SNAPSHOT_CONTENT = """
import gc, sys
later = [name for name in ("pickle", "hashlib", "urllib.parse") if name in sys.modules]
print(gc.get_freeze_count() > 10000, later)
"""


async def test_the_snapshot_holds_frozen_objects_and_no_module_a_session_may_not_need(
    anyio_backend: str,
) -> None:
    # Every sandbox maps the snapshot's pages until it writes them: the collector walking the
    # objects restored from it wrote into nearly all of them (frozen now, it never walks them),
    # and pickle (hibernation), hashlib and urllib.parse (the HTTP transport of other
    # environments) took ~0.5 MiB of it in every sandbox (imported where used now).
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        assert await ok(process, SNAPSHOT_CONTENT) == "True []\n"
        # Hibernation imports pickle when it runs.
        assert await ok(process, "kept = {'a': [1, 2]}") == ""
        blob = await process.hibernate()
    finally:
        await process.kill()
    restored = await SandboxProcess.restore(SETTINGS, blob)
    try:
        assert await ok(restored, "print(kept['a'][1])") == "2\n"
    finally:
        await restored.kill()


#: Where Pyodide believes it runs, then Node's `process` read from JavaScript: what it is, and
#: how much V8's heap grew by reading it (in MiB; Deno builds it at its first read).
NODE_PROCESS = """
import pyodide_js
from pyodide.code import run_js
kind, grown = run_js('''(() => {
  const before = Deno.memoryUsage().heapUsed;
  const node = globalThis.process.versions.node;
  return [typeof node, (Deno.memoryUsage().heapUsed - before) / 1048576];
})()''').to_py()
environment = pyodide_js._api.runtimeEnv
print(environment.IN_NODE, environment.IN_SHELL, kind, round(grown, 1))
"""


async def test_pyodide_loads_as_in_a_shell_and_node_is_left_unbuilt(anyio_backend: str) -> None:
    # Pyodide and Emscripten took Deno for Node: Deno built its Node `process` (1.2 MiB of
    # V8's heap) and Pyodide imported five Node modules, ~2.5 MiB of every loaded session.
    # Loaded as in a JavaScript shell, neither happens; `process` is there for a guest's
    # JavaScript once Pyodide is loaded, built when first read.
    process = await SandboxProcess.spawn(SETTINGS)
    try:
        in_node, in_shell, kind, grown = (await ok(process, NODE_PROCESS)).split()
    finally:
        await process.kill()
    assert (in_node, in_shell, kind) == ("False", "True", "string")
    assert float(grown) > 0.5, "Node's process was built before"


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
try:
    open(stdlib, "r+b")
except PermissionError:
    writable = False
else:
    writable = True
print(os.stat(stdlib).st_size, writable, os.path.exists("/rlm/pyodide"),
      difflib.get_close_matches("appel", ["apple", "pear"]),
      xml.dom.minidom.parseString("<a><b/></a>").documentElement.tagName)
"""


async def test_a_sandbox_reads_the_standard_library_from_disk(anyio_backend: str) -> None:
    # Pyodide installed the 2.5 MB zip into each sandbox's memory; now the sandbox imports from
    # the Pyodide directory's file (read-only to it, and nothing else of the directory is
    # visible to Python), and holds no copy.
    needle = _needle("python_stdlib.zip")
    size = (SETTINGS.pyodide_dir / "python_stdlib.zip").stat().st_size
    printed = f"{size} False False ['apple'] a\n"
    assert await _copies_in_a_sandbox(needle, STDLIB_IMPORTS, printed) == 0
