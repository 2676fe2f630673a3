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
// `stdlibFromDisk` then puts the real file in its place through Emscripten's NODEFS, before
// any guest code runs: Python reads the modules it imports from the Pyodide directory (the
// page cache, shared by every sandbox) instead of each sandbox holding a copy.
//
// The snapshot: Pyodide restores a snapshot with one `HEAP8.set(bytes)` into a fresh
// WebAssembly memory: that writes every page, and about half of the snapshot's 30 MB are zero
// pages, which a fresh memory already reads as zero without committing them. During the load,
// a copy of exactly the snapshot's bytes skips the pages that are zero on both sides (a read
// of an untouched page commits nothing), and afterwards the snapshot's own buffer is freed:
// Pyodide keeps a reference to it in its config, so dropping ours and collecting does not
// free it, while detaching it does, at once.

const PAGE = 4096;
const WORDS = PAGE / 4;

function zeroPage(words, first) {
  for (let i = first; i < first + WORDS; i++) if (words[i] !== 0) return false;
  return true;
}

// `Int8Array.prototype.set`, except for a copy of `snapshot`'s bytes to the start of a
// page-aligned array (Pyodide's restore): that one skips pages zero in source and target.
function sparseSet(original, snapshot) {
  return function set(source, offset = 0) {
    if (
      !ArrayBuffer.isView(source) ||
      source.buffer !== snapshot.buffer ||
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

// `WebAssembly.instantiate`, except that the buffer of the first binary it is given whole is
// detached once the call has copied it; every other call is the original's.
function detachingFirstBinary(original) {
  let detached = false;
  return function instantiate(source, ...rest) {
    const result = original.call(this, source, ...rest);
    const whole =
      ArrayBuffer.isView(source) &&
      source.buffer instanceof ArrayBuffer &&
      source.byteOffset === 0 &&
      source.byteLength === source.buffer.byteLength;
    if (!detached && whole) {
      detached = true;
      source.buffer.transfer(0);
    }
    return result;
  };
}

// `loadPyodide(options)`, from `snapshot` (the bytes `makeMemorySnapshot` gave) unless it is
// null; the snapshot's buffer and the binary's are detached (emptied) when this returns.
export async function loadPyodideLean(loadPyodide, options, snapshot) {
  const instantiate = WebAssembly.instantiate;
  WebAssembly.instantiate = detachingFirstBinary(instantiate);
  if (snapshot === null) {
    try {
      return await loadPyodide(options);
    } finally {
      WebAssembly.instantiate = instantiate;
    }
  }
  const own = Object.getOwnPropertyDescriptor(Int8Array.prototype, "set"); // none: inherited
  const original = Int8Array.prototype.set;
  Int8Array.prototype.set = sparseSet(original, snapshot);
  try {
    return await loadPyodide({ ...options, _loadSnapshot: snapshot });
  } finally {
    WebAssembly.instantiate = instantiate;
    if (own) Object.defineProperty(Int8Array.prototype, "set", own);
    else delete Int8Array.prototype.set;
    snapshot.buffer.transfer(0);
  }
}

// What a snapshot's restore installs as the standard library (an empty zip): see above.
export const STDLIB_PLACEHOLDER = new URL("./stdlib_placeholder.zip", import.meta.url).pathname;

// Put `pyodideDir`'s standard library zip in place of the one Pyodide installed in memory,
// mounted read-only in effect (Deno lets the sandbox read that directory, write nothing).
export function stdlibFromDisk(pyodide, pyodideDir) {
  const FS = pyodide.FS;
  const zip = FS.readdir("/lib").find((name) => /^python\d+\.zip$/.test(name));
  FS.mkdirTree("/rlm/pyodide");
  FS.mount(FS.filesystems.NODEFS, { root: pyodideDir }, "/rlm/pyodide");
  FS.unlink(`/lib/${zip}`);
  FS.symlink("/rlm/pyodide/python_stdlib.zip", `/lib/${zip}`);
}
