// Deno host of one sandbox: loads Pyodide (from the memory snapshot when given), imports the
// guest package, then serves framed requests from the supervisor over dedicated pipe fds
// (stdio can turn non-blocking and break synchronous reads). A frame is two big-endian u32
// (header length, payload length), a JSON header and raw payload bytes.
//
// Argument: one JSON object {pyodide_dir, guest_dir, repl_path, snapshot_path, make_snapshot,
// snapshot_in_pipe, fd_in, fd_out, fd_int, state_bytes, module_cache: {dir, files} | null}.
// Permissions come from the command line; this script needs read access to the Pyodide and
// guest directories, the REPL file, the snapshot file and the pipes (the snapshot's maker: its
// module cache directory too), and write access to the output pipe only.

import { loadPyodideLean, STDLIB_PLACEHOLDER, stdlibFromDisk } from "./pyodide_load.mjs";

// V8's collector (Deno runs with --expose-gc), taken off the global object before any guest
// code can run: only this script decides when to collect (see before "ready").
const collectGarbage = globalThis.gc;
globalThis.gc = undefined; // not configurable: emptied, not deleted

const config = JSON.parse(Deno.args[0]);
const input = Deno.openSync(`/dev/fd/${config.fd_in}`, { read: true });
const output = Deno.openSync(`/dev/fd/${config.fd_out}`, { write: true });
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const EXIT_PROTOCOL = 65;
const EXIT_FATAL = 70;

function readExact(length) {
  const buffer = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const n = input.readSync(buffer.subarray(got));
    if (n === null || n === 0) return null;
    got += n;
  }
  return buffer;
}

function readFrame() {
  const prefix = readExact(8);
  if (prefix === null) return null;
  const view = new DataView(prefix.buffer);
  const header = readExact(view.getUint32(0, false));
  const payloadLength = view.getUint32(4, false);
  const payload = payloadLength ? readExact(payloadLength) : new Uint8Array(0);
  if (header === null || payload === null) return null;
  return { header: decoder.decode(header), payload };
}

function writeAll(bytes) {
  let sent = 0;
  while (sent < bytes.length) sent += output.writeSync(bytes.subarray(sent));
}

// Frames up to this size go out in one write: the supervisor then wakes once per frame, not
// once per part (an llm_query frame is on every call's critical path).
const ONE_WRITE_BYTES = 1 << 20;

function writeFrame(header, payload) {
  const headerBytes = encoder.encode(typeof header === "string" ? header : JSON.stringify(header));
  const body = payload ?? new Uint8Array(0);
  const small = 8 + headerBytes.length + body.length <= ONE_WRITE_BYTES;
  const frame = new Uint8Array(8 + headerBytes.length + (small ? body.length : 0));
  const view = new DataView(frame.buffer);
  view.setUint32(0, headerBytes.length, false);
  view.setUint32(4, body.length, false);
  frame.set(headerBytes, 8);
  if (small && body.length) frame.set(body, 8 + headerBytes.length);
  writeAll(frame);
  if (!small) writeAll(body);
}

// The guest package at /rlm/rlm_guest, and beside it the REPL every environment runs
// (rlm_repl.py, the supervisor's own copy), which the guest imports as `rlm_repl`.
function loadGuest(pyodide) {
  const target = "/rlm/rlm_guest";
  pyodide.FS.mkdirTree(target);
  for (const entry of Deno.readDirSync(config.guest_dir)) {
    if (entry.isFile && entry.name.endsWith(".py")) {
      pyodide.FS.writeFile(`${target}/${entry.name}`, Deno.readFileSync(`${config.guest_dir}/${entry.name}`));
    }
  }
  pyodide.FS.writeFile("/rlm/rlm_repl.py", Deno.readFileSync(config.repl_path));
  pyodide.runPython("import sys\nif '/rlm' not in sys.path: sys.path.insert(0, '/rlm')\nimport rlm_guest.runtime");
}

const { loadPyodide, version } = await import(new URL(`file://${config.pyodide_dir}/pyodide.mjs`).href);
const quiet = () => {};
const options = { indexURL: `${config.pyodide_dir}/`, env: { HOME: "/home/pyodide" }, stdout: quiet, stderr: quiet };
let snapshot = null;
if (config.snapshot_path) snapshot = Deno.readFileSync(config.snapshot_path);
if (config.snapshot_in_pipe) {
  // Confined (bwrap), the snapshot file is not visible: its bytes are the first frame.
  const frame = readFrame();
  if (frame === null) Deno.exit(EXIT_PROTOCOL);
  snapshot = frame.payload;
}
if (config.make_snapshot) options._makeSnapshot = true;
if (snapshot) options.stdLibURL = STDLIB_PLACEHOLDER;
const pyodide = await loadPyodideLean(loadPyodide, options, snapshot);
const discard = { write: (bytes) => bytes.length };
pyodide.setStdout(discard);
pyodide.setStderr(discard);
loadGuest(pyodide);

if (config.make_snapshot) {
  writeFrame({ op: "snapshot_made", pyodide_version: version }, pyodide.makeMemorySnapshot());
  // Deno's module analysis cache (what it learnt parsing this script, Pyodide's modules and
  // the Node modules they import, for their imports), as Deno wrote it into this sandbox's
  // own cache directory: its database and write-ahead log. The supervisor keeps it beside
  // the snapshot and starts each sandbox with a copy, which spares it those parses.
  for (const name of config.module_cache?.files ?? []) {
    let bytes = null;
    try {
      bytes = Deno.readFileSync(`${config.module_cache.dir}/${name}`);
    } catch {
      continue; // not written: the supervisor keeps no cache
    }
    writeFrame({ op: "module_cache", name }, bytes);
  }
  Deno.exit(0);
}

stdlibFromDisk(pyodide, config.pyodide_dir);
// [0] pending signal, [1] running seq, [2] last seq interrupted (interrupt_worker.mjs)
const flags = new Int32Array(new SharedArrayBuffer(12));
pyodide.setInterruptBuffer(flags); // turns the interpreter's signal check on
// Pyodide's signal check (every 50 bytecodes or so; `_Py_CheckEmscriptenSignals_Helper` in
// pyodide.asm.mjs, which the timeout tests exercise) read the buffer's first slot, then wrote 0
// to it: two steps, and a signal the watcher stored between them was lost (about 1 timeout in
// 150 then ran on until the grace killed the sandbox and its state). It reads the buffer from
// this property each time (three times when it takes one): with no signal pending the property
// is empty, and the check ends there, writing nothing; with one, it is a view that takes the
// signal by one atomic exchange, then is still there for the write, which it ignores.
let takenUnwritten = false;
const takeSignal = {
  get 0() {
    takenUnwritten = true;
    return Atomics.exchange(flags, 0, 0);
  },
  set 0(_cleared) {
    takenUnwritten = false;
  },
};
Object.defineProperty(pyodide._module, "Py_EmscriptenSignalBuffer", {
  get: () => (flags[0] !== 0 || takenUnwritten ? takeSignal : undefined),
});
const watcher = new Worker(new URL("./interrupt_worker.mjs", import.meta.url).href, { type: "module" });
await new Promise((resolve, reject) => {
  watcher.onmessage = resolve;
  watcher.onerror = reject;
  watcher.postMessage({ sab: flags.buffer, path: `/dev/fd/${config.fd_int}` });
});

const memoryBytes = () => pyodide._module.HEAP8.buffer.byteLength;
// One reply per request: set once the current request's reply is written (see the loop).
let replied = false;
// Every frame sent during a request names it (the supervisor refuses another request's): the
// guest's JSON object with the request's number added last, so that it wins over any other.
let currentSeq = 0;
const stamped = (headerJson) => `${headerJson.slice(0, -1)},"seq":${currentSeq}}`;
const host = {
  call(headerJson) {
    writeFrame(stamped(headerJson));
    const frame = readFrame();
    if (frame === null) Deno.exit(0);
    return frame.header;
  },
  reply(headerJson, payload) {
    if (payload === undefined || payload === null) {
      writeFrame(stamped(headerJson));
    } else {
      const buffer = payload.getBuffer("u8");
      try {
        writeFrame(stamped(headerJson), buffer.data);
      } finally {
        buffer.release();
      }
    }
    replied = true;
  },
  memory_bytes: memoryBytes,
  sleep(ms) {
    Atomics.wait(flags, 0, 0, ms);
    return Atomics.load(flags, 0) !== 0;
  },
  clear_interrupt() {
    Atomics.store(flags, 0, 0);
  },
};
const runtime = pyodide.pyimport("rlm_guest.runtime");
runtime.install(host, config.state_bytes);
const dispatch = runtime.dispatch;
// V8 grew its heap while Pyodide loaded and would keep it: it shrinks a heap from idle-time
// tasks, which never run here (this process blocks on its input between requests). One
// memory-reducing collection before serving gives back ~12 MiB, and the heap stays near its
// live size as sessions run (their data lives in the WebAssembly memory).
collectGarbage?.({ type: "major", execution: "sync", flavor: "last-resort" });
writeFrame({ op: "ready", pyodide_version: version, memory_bytes: memoryBytes() });

for (;;) {
  const frame = readFrame();
  if (frame === null) break;
  let header;
  try {
    header = JSON.parse(frame.header);
  } catch {
    Deno.exit(EXIT_PROTOCOL);
  }
  if (header.op === "exit") break;
  Atomics.store(flags, 0, 0);
  replied = false;
  currentSeq = header.seq ?? 0;
  Atomics.store(flags, 1, currentSeq);
  // Its interrupt may have come before this request was read: the watcher saw another number
  // running and left this one in [2]. Both sides store, then read the other's slot, so one of
  // them sees the match (the interrupt is never lost to that race, and a stale one never hits).
  if (currentSeq && Atomics.load(flags, 2) === currentSeq) Atomics.store(flags, 0, 2);
  try {
    dispatch(frame.header, frame.payload.length ? frame.payload : undefined);
  } catch (error) {
    // A Python exception outside the guest's own handler (e.g. an interrupt landing there) is
    // reported. Anything else unwound through the interpreter (a JavaScript error from inside
    // wasm, e.g. os.system hitting a denied permission): its state cannot be trusted, so the
    // process ends and the supervisor reports the sandbox lost (fail closed).
    if (!(error instanceof pyodide.ffi.PythonError)) {
      console.error(`fatal: ${String(error).slice(0, 2000)}`);
      Deno.exit(EXIT_FATAL);
    }
    // Raised after the reply was written (a timeout's interrupt taken by the check right
    // after the reply's call returned): the request is answered, and a second frame would be
    // read as the next request's reply. Dropped.
    if (!replied) {
      const message = String(error.message).slice(0, 4000);
      writeFrame({ op: "error", type: error.type ?? "PythonError", message, seq: currentSeq });
    }
  } finally {
    Atomics.store(flags, 1, 0);
  }
}
Deno.exit(0);
