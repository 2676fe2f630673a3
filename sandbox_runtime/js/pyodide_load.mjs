// Loading Pyodide without keeping memory the session never uses.
//
// The WebAssembly binary: Pyodide reads pyodide.asm.wasm (9.6 MB) into a buffer and keeps
// that buffer for as long as the module lives (its instantiate function holds the read), while
// V8 compiles from its own copy, taken when `WebAssembly.instantiate` is called (the JS API's
// "stableBytes"). The first binary instantiated during the load is that one: its buffer is
// detached (`transfer(0)`) as soon as the call has copied it, which frees it at once.
//
// The standard library's zip (2.5 MB): Pyodide installs the zip `stdLibURL` names into its
// in-memory file system at every start. A sandbox restored from a snapshot is given an empty
// one (its interpreter read the real zip's directory when the snapshot was made), and
// `stdlibFromDisk` then puts the real file in its place (a file whose reads are Deno's), before
// any guest code runs: Python reads the modules it imports from the Pyodide directory (the
// page cache, shared by every sandbox) instead of each sandbox holding a copy.
//
// The snapshot: Pyodide restores a snapshot with one `HEAP8.set(bytes)` into a fresh
// WebAssembly memory, which would write every page of it into every sandbox. That call is
// intercepted (`restoringSet`). A sandbox given the runtime's snapshot file maps its image
// there instead, copy-on-write, so the pages no session writes are one copy for all
// sandboxes (`snapshotFromDescriptor`). Given the bytes (over its pipe), it copies them,
// skipping the pages that are zero on both sides (about half of the 30 MB; a read of an
// untouched page commits nothing). Afterwards the snapshot's own buffer is freed: Pyodide
// keeps a reference to it in its config, so dropping ours and collecting does not free it,
// while detaching it does, at once.
//
// The binary's data segments (3.3 of its 9.6 MB): V8 keeps its copy of a module's bytes for
// as long as the module lives (it compiles functions from them as they are first called), data
// included, although active data segments are read once, when an instance is made. V8 is given
// the binary with every segment emptied (the same segments, offsets and count, length 0), and
// the segments' bytes are written into the new instance's memory before anything runs in it,
// as instantiation would have written them; then Pyodide's buffer is freed.
//
// Pyodide's JavaScript (pyodide.asm.mjs, 1.2 MB): imported as a module, Deno's module loader
// kept its own copy of the source beside V8's. It is evaluated as a script instead (its one
// `export` dropped, `import.meta.url` spelt out), which leaves V8's copy only, and without
// the loader's eager linking pass for side modules (see `EAGER_GOT`).
//
// The snapshot's maker zeroes the allocator's free memory before the snapshot is taken
// (`zeroFreeMemory`): what the interpreter freed while starting is left as garbage, which the
// sparse restore would otherwise copy into every sandbox like live data.
//
// Node: Pyodide (pyodide.mjs, and its copy inside pyodide.asm.mjs) and Emscripten's module
// take Deno for Node when they see `process`. Reading it makes Deno build its Node `process`
// (1.2 MiB of V8's heap), Pyodide then imports node:fs, node:path, node:url, node:vm and
// node:module (1.6 MiB more, and more pages of Deno's binary), and Emscripten's Node paths
// call Node for what the sandbox denies: `os.getuid()`, `input()`, `os.system()` and a
// listening socket each ended the sandbox with a fatal error (Deno refused the permission
// inside the interpreter). So while Pyodide is imported and loaded (`asShell`), `process` is
// hidden and the two functions of a JavaScript shell Pyodide reads files with are given
// (`read`, `readbuffer`: the lock file, the binary, the standard library's zip; `load` must
// exist, and is never called), and Emscripten's module is evaluated as neither on Node nor in
// a shell (`NODE_ENVIRONMENT`): it uses the Web APIs Deno has (crypto.getRandomValues,
// performance.now) and answers those calls with errors Python raises (and a uid of 0).
// `process` is put back afterwards, for a guest's JavaScript. The standard library's zip is
// then read through Deno (`stdlibFromDisk`), not Emscripten's NODEFS.
//
// The function table's JavaScript view (2.2 MiB of V8's heap): the first time Emscripten's
// loader looks a function up in the table, it reads the whole table to map functions to
// slots, which makes V8 create a JavaScript function for each of its 8,732 slots and keep
// them. The slots of the binary's own functions are read from its element section instead
// (`MainTableSlots`), and a lookup reads the one slot it needs (see `LAZY_TABLE_MAP`).

const PAGE = 4096;
const WORDS = PAGE / 4;

function zeroPage(words, first) {
  for (let i = first; i < first + WORDS; i++) if (words[i] !== 0) return false;
  return true;
}

// `Int8Array.prototype.set`, except for the copy of the snapshot's image (a part of
// `snapshot`'s buffer) to the start of a page-aligned array, Pyodide's restore. With `image`
// (`snapshotFromDescriptor`), the image is mapped there, or else read into `source` first.
// The copy skips pages zero in source and target.
function restoringSet(original, snapshot, image) {
  return function set(source, offset = 0) {
    if (!ArrayBuffer.isView(source) || source.buffer !== snapshot.buffer) {
      return original.call(this, source, offset);
    }
    if (image?.into(offset === 0 ? this : null, source)) return;
    if (
      offset !== 0 ||
      this.byteOffset % PAGE !== 0 ||
      source.byteOffset % 4 !== 0 ||
      source.byteLength > this.byteLength
    ) {
      return original.call(this, source, offset);
    }
    const target = new Uint8Array(this.buffer, this.byteOffset, source.byteLength);
    const from = new Uint8Array(source.buffer, source.byteOffset, source.byteLength);
    const targetWords = new Int32Array(this.buffer, this.byteOffset, source.byteLength >> 2);
    const fromWords = new Int32Array(source.buffer, source.byteOffset, source.byteLength >> 2);
    for (let start = 0; start < from.length; start += PAGE) {
      const end = Math.min(start + PAGE, from.length);
      const word = start / 4;
      const skip = end - start === PAGE && zeroPage(fromWords, word) && zeroPage(targetWords, word);
      if (!skip) target.set(from.subarray(start, end), start);
    }
  };
}

// The LEB128 number at `bytes[at]` (signed: an i32.const), and in `lebEnd` the index past
// it. No array is made per number: a binary's sections hold tens of thousands of them, read
// at every sandbox start in a cold process (returning pairs took the split 23 ms, not 10).
let lebEnd = 0;
function leb(bytes, at, signed = false) {
  let value = 0;
  let shift = 0;
  let byte;
  do {
    byte = bytes[at++];
    value += (byte & 0x7f) * 2 ** shift;
    shift += 7;
  } while (byte & 0x80);
  lebEnd = at;
  return signed && byte & 0x40 ? value - 2 ** shift : value;
}

// Where each section of a WebAssembly binary is: Map(id -> {start, body, end}) (the section's
// first byte, its content's, and the index past it; custom sections, id 0, left out).
function sections(bytes) {
  const found = new Map();
  for (let at = 8; at < bytes.length; ) {
    const size = leb(bytes, at + 1);
    const body = lebEnd;
    if (bytes[at] !== 0) found.set(bytes[at], { start: at, body, end: body + size });
    at = body + size;
  }
  return found;
}

function lebBytes(value) {
  const bytes = [];
  do {
    const low = value % 128;
    value = Math.floor(value / 128);
    bytes.push(value ? low | 0x80 : low);
  } while (value);
  return bytes;
}

const DATA_SECTION = 11;
const START_SECTION = 8;
const I32_CONST = 0x41;
const END = 0x0b;

// `bytes` (a WebAssembly binary) with its data segments emptied (the same segments, kinds,
// offsets and count, each of length 0), and where each segment's bytes go: {module, segments}
// with segments = [offset, start, length] * count (start: in `bytes`). Null when the binary
// has no segment, one of another kind than "active, memory 0, at a constant offset", or a
// start function (which would run before the segments are written): used as it is then.
// It runs at every sandbox start, in a cold process, over 14,579 segments: hence one flat
// array, and the output written once at its exact size.
export function splitDataSegments(bytes) {
  const all = sections(bytes);
  const section = all.get(DATA_SECTION);
  if (all.has(START_SECTION) || section === undefined) return null;
  const count = leb(bytes, section.body);
  const first = lebEnd;
  if (count === 0) return null;
  const segments = new Uint32Array(count * 3);
  const headers = new Uint8Array(count); // each segment's kind and offset expression, in bytes
  let headerBytes = 0;
  let p = first;
  for (let i = 0; i < count; i++) {
    const segmentStart = p;
    if (bytes[p] !== 0 || bytes[p + 1] !== I32_CONST) return null;
    const offset = leb(bytes, p + 2, true);
    p = lebEnd;
    if (bytes[p++] !== END) return null;
    headers[i] = p - segmentStart;
    headerBytes += p - segmentStart;
    const length = leb(bytes, p);
    p = lebEnd;
    segments[i * 3] = offset >>> 0;
    segments[i * 3 + 1] = p;
    segments[i * 3 + 2] = length;
    p += length;
  }
  const countBytes = lebBytes(count);
  const bodySize = countBytes.length + headerBytes + count; // + one 0 length each
  const prefix = [DATA_SECTION, ...lebBytes(bodySize)];
  const tail = bytes.subarray(section.end);
  const module = new Uint8Array(section.start + prefix.length + bodySize + tail.length);
  module.set(bytes.subarray(0, section.start));
  let out = section.start;
  for (const value of [...prefix, ...countBytes]) module[out++] = value;
  for (let i = 0; i < count; i++) {
    const headerStart = i === 0 ? first : segments[i * 3 - 2] + segments[i * 3 - 1];
    for (let copied = headerStart; copied < headerStart + headers[i]; copied++) {
      module[out++] = bytes[copied];
    }
    module[out++] = 0; // length 0
  }
  module.set(tail, out);
  return { module, segments };
}

// Writes `split`'s segments (their bytes in `bytes`) into the memory `instance` exports.
function writeDataSegments(instance, split, bytes) {
  const memory = Object.values(instance.exports).find((value) => value instanceof WebAssembly.Memory);
  if (!memory) throw new Error("the binary's data segments have no exported memory to go to");
  const heap = new Uint8Array(memory.buffer);
  const { segments } = split;
  for (let i = 0; i < segments.length; i += 3) {
    const start = segments[i + 1];
    heap.set(bytes.subarray(start, start + segments[i + 2]), segments[i]);
  }
}

const ELEMENT_SECTION = 9;
const ACTIVE_TABLE_0 = 0; // an element segment's flags: active, table 0, function indices

// Where the binary's element section puts each function in table 0: an Int32Array of the
// last slot of each function index (as a scan of the table in order would find it), -1 for
// none. Null when the section holds a segment of another kind or at an offset that is not a
// constant.
export function elementSlots(bytes) {
  const section = sections(bytes).get(ELEMENT_SECTION);
  if (section === undefined) return null;
  const placed = []; // function index, slot, ...
  let count = leb(bytes, section.body);
  let p = lebEnd;
  for (; count > 0; count--) {
    if (bytes[p] !== ACTIVE_TABLE_0 || bytes[p + 1] !== I32_CONST) return null;
    const offset = leb(bytes, p + 2, true);
    p = lebEnd;
    if (offset < 0 || bytes[p++] !== END) return null;
    const functions = leb(bytes, p);
    p = lebEnd;
    for (let slot = offset; slot < offset + functions; slot++) {
      placed.push(leb(bytes, p), slot);
      p = lebEnd;
    }
  }
  let last = -1;
  for (let i = 0; i < placed.length; i += 2) last = Math.max(last, placed[i]);
  const slots = new Int32Array(last + 1).fill(-1);
  for (let i = 0; i < placed.length; i += 2) slots[placed[i]] = placed[i + 1];
  return slots;
}

// The slots of the main module's functions in the function table, for Emscripten's
// `getFunctionAddress` (its text patched by `evaluatedModuleFactory`): `known` once the
// binary's element section was read (else the loader reads the whole table, as it did).
export class MainTableSlots {
  #slots = null;

  get known() {
    return this.#slots !== null;
  }

  learn(bytes) {
    this.#slots = elementSlots(bytes);
  }

  // `func`'s slot if it is one of the main module's functions where its element section put
  // it (V8 names an exported WebAssembly function by its index; the table's own entry at
  // that slot must be `func` itself), recorded in `map`; else 0.
  find(func, tableEntry, map) {
    if (!this.known || typeof func !== "function" || !/^\d+$/.test(func.name)) return 0;
    const slot = this.#slots[Number(func.name)] ?? -1;
    if (slot < 0 || tableEntry(slot) !== func) return 0;
    map.set(func, slot);
    return slot;
  }
}

// `WebAssembly.instantiate`, except for the first binary it is given whole (Pyodide's): V8
// gets it without its data segments, which are written into the instance's memory when the
// call resolves, and the binary's buffer is detached then (freed). Every other call is the
// original's. `tableSlots` learns the binary's element section.
function leanFirstBinary(original, tableSlots) {
  let done = false;
  return function instantiate(source, ...rest) {
    const whole =
      ArrayBuffer.isView(source) &&
      source.buffer instanceof ArrayBuffer &&
      source.byteOffset === 0 &&
      source.byteLength === source.buffer.byteLength;
    if (done || !whole) return original.call(this, source, ...rest);
    done = true;
    tableSlots.learn(source);
    const split = splitDataSegments(source);
    if (split === null) {
      const result = original.call(this, source, ...rest);
      source.buffer.transfer(0); // copied by the call
      return result;
    }
    return original.call(this, split.module, ...rest).then(
      (result) => {
        writeDataSegments(result.instance, split, source);
        source.buffer.transfer(0);
        return result;
      },
      (error) => {
        source.buffer.transfer(0);
        throw error;
      },
    );
  };
}

// Emscripten's loader, once the main module is instantiated, gives every function it exports
// (7,415) a slot in the function table and a global offset table entry, for side modules
// (.so) to link against: 5,400 more slots and as many `WebAssembly.Global`s, 1.4 MiB of V8's
// heap. A sandbox loads no side module (no package, no network); one that did would still
// link, since the loader resolves a side module's undefined symbols when it loads it
// (`reportUndefinedSymbols`), which is how the main module's own 280 GOT imports are resolved
// without the eager pass. Both the snapshot's maker and every sandbox skip it, so the table
// indices a snapshot holds are the ones a sandbox assigns: whatever restores a snapshot loads
// Pyodide through `loadPyodideLean`, which uses `evaluatedModuleFactory` (a plain import fails
// with "function signature mismatch"). Left as it is when the text differs.
const EAGER_GOT = "assignWasmExports(wasmExports);updateGOT(origExports);";
const EAGER_GOT_SKIPPED = "assignWasmExports(wasmExports);";

// Emscripten's `getFunctionAddress`: its first lookup reads the whole table into a map of
// function -> slot (a JavaScript function made and kept for every slot); then each lookup
// reads the map, which `addFunction` and a side module's loader keep up to date for the
// slots they fill. Patched, the binary's own slots are found one at a time through
// `MainTableSlots` (`__rlmTableSlots` in the evaluated script), with the same answers: the
// slot the element section gave the function, checked against the table. Left as it is when
// the text differs; and if the element section could not be read, the first lookup reads
// the whole table as before.
const LAZY_TABLE_MAP =
  "functionsInTableMap=new WeakMap;updateTableMap(0,wasmTable.length)}return functionsInTableMap.get(func)||0";
const LAZY_TABLE_MAP_PATCHED =
  "functionsInTableMap=new WeakMap;if(!__rlmTableSlots.known)updateTableMap(0,wasmTable.length)}" +
  "return functionsInTableMap.get(func)||__rlmTableSlots.find(func,getWasmTableEntry,functionsInTableMap)";

// How Emscripten's module tells where it runs; patched while `asShell` is in effect (above).
const NODE_ENVIRONMENT =
  'var ENVIRONMENT_IS_NODE=globalThis.process?.versions?.node&&globalThis.process?.type!="renderer";' +
  "var ENVIRONMENT_IS_SHELL=!ENVIRONMENT_IS_WEB&&!ENVIRONMENT_IS_NODE&&!ENVIRONMENT_IS_WORKER;";
const NO_NODE_ENVIRONMENT = "var ENVIRONMENT_IS_NODE=false;var ENVIRONMENT_IS_SHELL=false;";
const EXPORTED = "export default _createPyodideModule;";
let shell = false; // `asShell` in effect
let readAhead = null; // {pyodideDir, source}: what `asShell` read, for the factory to take

// pyodide.asm.mjs's text; undefined when it cannot be read (Pyodide's own import then reports
// why) or is not the module this expects (one default export at its end). Read once per
// start: the text `asShell` read (1.2 MB) is the factory's, then dropped.
function moduleSource(pyodideDir) {
  if (readAhead?.pyodideDir === pyodideDir) {
    const { source } = readAhead;
    readAhead = null;
    return source;
  }
  let source;
  try {
    source = Deno.readTextFileSync(`${pyodideDir}/pyodide.asm.mjs`).trimEnd();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotCapable) {
      return undefined;
    }
    throw error;
  }
  return source.endsWith(EXPORTED) ? source : undefined;
}

// Pyodide imported and loaded from `pyodideDir` as in a JavaScript shell, not as on Node (see
// above), from now until the function this returns is called; nothing changes when Pyodide's
// module is not one this can load that way (then it loads as on Node, as before).
export function asShell(pyodideDir) {
  if (shell) return () => {};
  const source = moduleSource(pyodideDir);
  if (!source?.includes(NODE_ENVIRONMENT)) return () => {};
  readAhead = { pyodideDir, source };
  const process = Object.getOwnPropertyDescriptor(globalThis, "process");
  delete globalThis.process;
  globalThis.read = (path) => Deno.readTextFileSync(path);
  globalThis.readbuffer = (path) => Deno.readFileSync(path).buffer; // its own, whole
  globalThis.load = (path) => {
    throw new Error(`no script is loaded in a sandbox: ${path}`);
  };
  shell = true;
  return () => {
    readAhead = null; // not taken (another factory was given): not kept either
    delete globalThis.read;
    delete globalThis.readbuffer;
    delete globalThis.load;
    if (process) Object.defineProperty(globalThis, "process", process);
    shell = false;
  };
}

// Pyodide's module factory (what pyodide.asm.mjs exports), its source evaluated as a script
// (Pyodide's `createPyodideModule` option), without the eager GOT pass and with the table's
// slots found through `tableSlots` (above), as neither on Node nor in a shell while `asShell`
// is in effect; undefined when the file cannot be read or is not the module this expects
// (`moduleSource`, or a static import): Pyodide then imports it.
export function evaluatedModuleFactory(pyodideDir, tableSlots = new MainTableSlots()) {
  const url = new URL(`file://${pyodideDir}/pyodide.asm.mjs`).href;
  const source = moduleSource(pyodideDir);
  if (source === undefined) return undefined;
  const body = source
    .slice(0, -EXPORTED.length)
    .replaceAll("import.meta.url", JSON.stringify(url))
    .replace(EAGER_GOT, EAGER_GOT_SKIPPED)
    .replace(LAZY_TABLE_MAP, LAZY_TABLE_MAP_PATCHED)
    .replace(NODE_ENVIRONMENT, shell ? NO_NODE_ENVIRONMENT : NODE_ENVIRONMENT);
  try {
    // Indirect eval: global scope, nothing of this module's in reach but `tableSlots`; the
    // factory stays local. Strict, as the module's code was (a script is sloppy by default).
    const script = `"use strict";((__rlmTableSlots) => {${body}\nreturn _createPyodideModule;})`;
    return (0, eval)(`${script}\n//# sourceURL=${url}`)(tableSlots);
  } catch (error) {
    if (error instanceof SyntaxError) return undefined; // e.g. a static import
    throw error;
  }
}

// `loadPyodide(options)`, from `snapshot` (the bytes `makeMemorySnapshot` gave, or from
// `snapshotFromDescriptor` with its `image`) unless it is null; the snapshot's buffer and the
// binary's are detached (emptied) when this returns.
// Pyodide's module comes from `evaluatedModuleFactory` (of `options.indexURL`) unless
// `options.createPyodideModule` names one: every load, the snapshot's maker's and each
// restore, makes the same function table.
export async function loadPyodideLean(loadPyodide, givenOptions, snapshot, image = null) {
  const tableSlots = new MainTableSlots();
  const factory =
    givenOptions.createPyodideModule ??
    evaluatedModuleFactory(givenOptions.indexURL.replace(/\/$/, ""), tableSlots);
  const options = factory ? { ...givenOptions, createPyodideModule: factory } : givenOptions;
  const instantiate = WebAssembly.instantiate;
  WebAssembly.instantiate = leanFirstBinary(instantiate, tableSlots);
  if (snapshot === null) {
    try {
      return await loadPyodide(options);
    } finally {
      WebAssembly.instantiate = instantiate;
    }
  }
  const own = Object.getOwnPropertyDescriptor(Int8Array.prototype, "set"); // none: inherited
  const original = Int8Array.prototype.set;
  Int8Array.prototype.set = restoringSet(original, snapshot, image);
  try {
    return await loadPyodide({ ...options, _loadSnapshot: snapshot });
  } finally {
    WebAssembly.instantiate = instantiate;
    if (own) Object.defineProperty(Int8Array.prototype, "set", own);
    else delete Int8Array.prototype.set;
    snapshot.buffer.transfer(0);
  }
}

// The snapshot in the runtime's sealed memory file, descriptor `fd` (its layout:
// sandbox_runtime/worker/snapshot_memory.py), through the C library at `libcPath`, the one
// library Deno lets this process open: {snapshot, image}. `snapshot` is what Pyodide reads:
// the header, then an image of zeros, never touched (calloc'd pages). `image.into(target,
// source)` maps the file's image over the start of the WebAssembly memory `target`, private
// and copy-on-write, and answers true; if the mapping fails (or `target` is null: the copy
// goes elsewhere), it reads the image into `source` (the snapshot's image), answering false.
// Either way the descriptor is closed, the library too, and the FFI permission revoked
// (host.mjs revokes it again before any guest code runs, whatever happened).
//
// The file's holes are the image's zero pages. A hole of at least `UNMAPPED_HOLE` is not
// mapped: the memory is left as it is there, zero (a page written at instantiation is
// zeroed), which reads as the kernel's one zero page; a read of a hole the mapping covers
// would give the file a zeroed page of its own (shared, but memory all the same).
const UNMAPPED_HOLE = 16 * PAGE;

export function snapshotFromDescriptor(fd, libcPath) {
  const libc = Deno.dlopen(libcPath, {
    pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
    lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
    mmap: { parameters: ["buffer", "usize", "i32", "i32", "i32", "i64"], result: "isize" },
    close: { parameters: ["i32"], result: "i32" },
  });
  const done = () => {
    libc.symbols.close(fd);
    libc.close();
    Deno.permissions.revokeSync({ name: "ffi" });
  };
  const readAt = (into, position) => {
    for (let got = 0; got < into.length; ) {
      const n = Number(libc.symbols.pread(fd, into.subarray(got), into.length - got, BigInt(position + got)));
      if (n <= 0) throw new Error("the snapshot's memory file is shorter than it says");
      got += n;
    }
  };
  let snapshot, imageAt, size;
  try {
    size = Number(libc.symbols.lseek(fd, 0n, SEEK_END));
    const first = new Uint8Array(PAGE);
    readAt(first, 0);
    const headerBytes = new DataView(first.buffer).getUint32(4, true);
    imageAt = Math.max(PAGE, Math.ceil(headerBytes / PAGE) * PAGE);
    if (headerBytes < 8 || headerBytes > PAGE || imageAt > size) throw new Error("not a snapshot's memory file");
    snapshot = new Uint8Array(headerBytes + size - imageAt);
    snapshot.set(first.subarray(0, headerBytes));
  } catch (error) {
    done();
    throw error;
  }
  // The file's next hole (or data) at or after `offset` in the image; the image's end if none.
  const seek = (offset, whence) => {
    const found = Number(libc.symbols.lseek(fd, BigInt(imageAt + offset), whence));
    return found < 0 ? size - imageAt : Math.min(found - imageAt, size - imageAt);
  };
  // [start, end) of the image to map: all of it but its holes of UNMAPPED_HOLE or more.
  const mappedRanges = (length) => {
    const ranges = [];
    let start = 0;
    for (let at = 0; at < length; ) {
      const hole = Math.min(seek(at, SEEK_HOLE), length);
      if (hole >= length) break;
      const data = Math.min(seek(hole, SEEK_DATA), length);
      if (data - hole >= UNMAPPED_HOLE) {
        if (hole > start) ranges.push([start, hole]);
        start = data;
      }
      at = data;
    }
    if (start < length) ranges.push([start, length]);
    return ranges;
  };
  const map = (target, length) => {
    if (!target || target.byteOffset % PAGE !== 0 || length % PAGE !== 0 || length > target.byteLength) {
      return false;
    }
    const words = new Int32Array(target.buffer, target.byteOffset, length / 4);
    let end = 0;
    for (const [start, stop] of [...mappedRanges(length), [length, length]]) {
      for (let page = end; page < start; page += PAGE) {
        if (!zeroPage(words, page / 4)) words.fill(0, page / 4, (page + PAGE) / 4);
      }
      if (stop > start) {
        const at = new Uint8Array(target.buffer, target.byteOffset + start, stop - start);
        const offset = BigInt(imageAt + start);
        if (Number(libc.symbols.mmap(at, stop - start, PROT_READ_WRITE, MAP_PRIVATE_FIXED, fd, offset)) === -1) {
          return false; // the copy that follows writes every page again
        }
      }
      end = stop;
    }
    return true;
  };
  const image = {
    restored: null, // "mapped" or "read", once `into` ran
    into(target, source) {
      try {
        if (map(target, source.byteLength)) {
          image.restored = "mapped";
          return true;
        }
        readAt(new Uint8Array(source.buffer, source.byteOffset, source.byteLength), imageAt);
        image.restored = "read";
        return false;
      } finally {
        done();
      }
    },
  };
  return { snapshot, image };
}
// Linux's, on x86_64 and aarch64 alike.
const SEEK_END = 2;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const PROT_READ_WRITE = 0x1 | 0x2;
const MAP_PRIVATE_FIXED = 0x02 | 0x10;

// The allocator's free memory zeroed, for the snapshot's maker: every free block is taken
// through `malloc`, largest sizes first, filled with zeros and given back (the allocator then
// writes only its own few bytes of bookkeeping into them). A size is not asked for when the
// heap could not grow by it within the memory as it is, and a block that came from growing
// the heap (fresh memory, zero already) is given back at once: the memory never grows, and
// the snapshot keeps its size. Returns the bytes zeroed (0, and nothing done, when the module
// does not export the allocator's functions this needs).
export function zeroFreeMemory(module) {
  const needed = ["_malloc", "_free", "_sbrk", "_malloc_usable_size"];
  if (!needed.every((name) => typeof module[name] === "function")) return 0;
  const taken = [];
  let zeroed = 0;
  try {
    for (let size = 1 << 20; size >= 8; size >>= 1) {
      for (;;) {
        const top = module._sbrk(0);
        if (top + size + 65536 > module.HEAPU8.length) break;
        const pointer = module._malloc(size);
        if (pointer === 0) break;
        if (module._sbrk(0) !== top) {
          module._free(pointer);
          break;
        }
        const usable = module._malloc_usable_size(pointer); // the block's slack too
        module.HEAPU8.fill(0, pointer, pointer + usable);
        taken.push(pointer);
        zeroed += usable;
      }
    }
  } finally {
    for (const pointer of taken) module._free(pointer);
  }
  return zeroed;
}

// Pyodide's lock file with no package in it, for `loadPyodide`'s `lockFileContents`. A
// sandbox can load no package (only Pyodide's core files are installed, and it has no
// network), and Pyodide keeps every entry of the real one in JavaScript (357 packages: their
// names, files, hashes, imports and dependencies) and their import names in Python (to tell
// a failed import which package has the module, and that it can be installed).
export function lockfileWithoutPackages(pyodideDir) {
  const lockfile = JSON.parse(Deno.readTextFileSync(`${pyodideDir}/pyodide-lock.json`));
  return { ...lockfile, packages: {} };
}

// What a snapshot's restore installs as the standard library (an empty zip): see above.
export const STDLIB_PLACEHOLDER = new URL("./stdlib_placeholder.zip", import.meta.url).pathname;

// Put `pyodideDir`'s standard library zip in place of the one Pyodide installed in memory: a
// read-only file of the in-memory file system whose reads are reads of the real file, kept
// open (Deno lets the sandbox read that directory, write nothing). Nothing else of the
// directory is visible to Python.
export function stdlibFromDisk(pyodide, pyodideDir) {
  const FS = pyodide.FS;
  const zip = FS.readdir("/lib").find((name) => /^python\d+\.zip$/.test(name));
  const file = Deno.openSync(`${pyodideDir}/python_stdlib.zip`, { read: true });
  const size = file.statSync().size;
  FS.unlink(`/lib/${zip}`);
  const node = FS.createFile("/lib", zip, {}, true, false);
  Object.defineProperty(node, "usedBytes", { get: () => size }); // its size to stat and seek
  // No write, no mmap: Emscripten's FS refuses both (EINVAL, ENODEV).
  node.stream_ops = {
    llseek: node.stream_ops.llseek,
    read(_stream, buffer, offset, length, position) {
      const wanted = Math.max(0, Math.min(length, size - position));
      const target = new Uint8Array(buffer.buffer, buffer.byteOffset + offset, wanted);
      file.seekSync(position, Deno.SeekMode.Start);
      let got = 0;
      while (got < wanted) {
        const n = file.readSync(target.subarray(got));
        if (n === null || n === 0) break;
        got += n;
      }
      return got;
    },
  };
}
