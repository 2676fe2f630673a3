// Loading Pyodide from its memory snapshot without keeping memory the session never uses.
//
// Pyodide restores a snapshot with one `HEAP8.set(bytes)` into a fresh WebAssembly memory:
// that writes every page, and about half of the snapshot's 30 MB are zero pages, which a
// fresh memory already reads as zero without committing them. During the load, a copy of
// exactly the snapshot's bytes skips the pages that are zero on both sides (a read of an
// untouched page commits nothing), and afterwards the snapshot's own buffer is freed: Pyodide
// keeps a reference to it in its config, so dropping ours and collecting does not free it,
// while detaching it (`transfer(0)`) does, at once.

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

// `loadPyodide(options)` from `snapshot` (the bytes `makeMemorySnapshot` gave); the
// snapshot's buffer is detached (emptied) when this returns.
export async function loadFromSnapshot(loadPyodide, options, snapshot) {
  const own = Object.getOwnPropertyDescriptor(Int8Array.prototype, "set"); // none: inherited
  const original = Int8Array.prototype.set;
  Int8Array.prototype.set = sparseSet(original, snapshot);
  try {
    return await loadPyodide({ ...options, _loadSnapshot: snapshot });
  } finally {
    if (own) Object.defineProperty(Int8Array.prototype, "set", own);
    else delete Int8Array.prototype.set;
    snapshot.buffer.transfer(0);
  }
}
