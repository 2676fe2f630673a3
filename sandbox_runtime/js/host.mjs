// Deno host of one sandbox: loads Pyodide (from the memory snapshot when given), imports the
// guest package, then serves framed requests from the supervisor over dedicated pipe fds
// (stdio can turn non-blocking and break synchronous reads). A frame is two big-endian u32
// (header length, payload length), a JSON header and raw payload bytes.
//
// Argument: one JSON object {pyodide_dir, guest_dir, repl_path, snapshot_fd, map_with,
// snapshot_in_pipe, make_snapshot, fd_in, fd_out, interrupt_path, state_bytes}. Permissions
// come from the command line; this script needs read access to the Pyodide and guest
// directories, the REPL file, the input pipe and the interrupt file, write access to the
// output pipe only, and FFI access to the C library `map_with` until Pyodide is loaded.

import {
  asShell,
  loadPyodideLean,
  lockfileWithoutPackages,
  snapshotFromDescriptor,
  STDLIB_PLACEHOLDER,
  stdlibFromDisk,
  zeroFreeMemory,
} from "./pyodide_load.mjs";

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

function readExact(length, file = input) {
  const buffer = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const n = file.readSync(buffer.subarray(got));
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

// Pyodide as in a JavaScript shell, not as on Node, until it is loaded (pyodide_load.mjs).
const showNode = asShell(config.pyodide_dir);
const { loadPyodide, version } = await import(new URL(`file://${config.pyodide_dir}/pyodide.mjs`).href);
const quiet = () => {};
const options = {
  indexURL: `${config.pyodide_dir}/`,
  lockFileContents: lockfileWithoutPackages(config.pyodide_dir),
  env: { HOME: "/home/pyodide" },
  stdout: quiet,
  stderr: quiet,
};
// The snapshot: the runtime's sealed memory file, its image mapped during the load; or its
// bytes, the first frame.
let snapshot = null;
let image = null;
if (config.snapshot_fd !== null) ({ snapshot, image } = snapshotFromDescriptor(config.snapshot_fd, config.map_with));
if (config.snapshot_in_pipe) {
  const frame = readFrame();
  if (frame === null) Deno.exit(EXIT_PROTOCOL);
  snapshot = frame.payload;
}
if (config.make_snapshot) options._makeSnapshot = true;
if (snapshot) options.stdLibURL = STDLIB_PLACEHOLDER;
const pyodide = await loadPyodideLean(loadPyodide, options, snapshot, image);
showNode();
// How the snapshot's image got into the memory, for the supervisor: "mapped", "read" (from
// the memory file, the mapping refused), "piped" (its bytes over the pipe), or null.
const restored = image?.restored ?? (config.snapshot_in_pipe ? "piped" : null);
Deno.permissions.revokeSync({ name: "ffi" }); // given for the mapping alone: gone, whatever it did
const discard = { write: (bytes) => bytes.length };
pyodide.setStdout(discard);
pyodide.setStderr(discard);
loadGuest(pyodide);

if (config.make_snapshot) {
  // What the start left to collect, then the allocator's free memory zeroed: garbage would be
  // restored into every sandbox like live data (zero pages are skipped). What is left is
  // frozen (gc.freeze): the collector never walks it again, so a session's collections do not
  // write into every page of it, which every sandbox maps from one file until it writes.
  const gc = pyodide.pyimport("gc");
  gc.collect();
  gc.freeze();
  gc.destroy();
  zeroFreeMemory(pyodide._module);
  writeFrame({ op: "snapshot_made", pyodide_version: version }, pyodide.makeMemorySnapshot());
  Deno.exit(0);
}

stdlibFromDisk(pyodide, config.pyodide_dir);
// Interrupts. The supervisor writes the number of the request to interrupt (a big-endian i32)
// at the start of a small file of this sandbox's (`launcher.InterruptFile`). This thread reads
// it (a seek and a 4-byte read) when a request starts running Python, every POLL_CHECKS of the
// interpreter's signal checks (one every ~50 bytecodes: POLL_CHECKS of them are a few ms of
// Python), and between the slices of the patched time.sleep. The number of the request
// running raises KeyboardInterrupt in it, once; another is stale (or early: its request has
// not started) and waits. There is no second thread: a Worker blocked on a pipe for this cost
// ~4.4 MiB per sandbox (an isolate of its own), and its hand-over through shared memory lost
// signals to Pyodide's read-then-clear of the slot.
const POLL_CHECKS = 2048;
const SLEEP_SLICE_MS = 10;
const interruptFile = Deno.openSync(config.interrupt_path, { read: true });
let currentSeq = 0; // the request running (0: none)
let interruptedSeq = 0; // the last request interrupted: each is, once
function interruptDue() {
  if (currentSeq === 0 || interruptedSeq === currentSeq) return false;
  interruptFile.seekSync(0, Deno.SeekMode.Start);
  const number = readExact(4, interruptFile);
  if (number === null || new DataView(number.buffer).getInt32(0, false) !== currentSeq) return false;
  interruptedSeq = currentSeq;
  return true;
}
pyodide.setInterruptBuffer(new Int32Array(1)); // turns the interpreter's signal check on
// Pyodide's check (`_Py_CheckEmscriptenSignals_Helper` in pyodide.asm.mjs, which the timeout
// tests exercise) reads this property each time: empty, the check ends there; else it reads
// the signal from [0] (2, SIGINT: KeyboardInterrupt) and writes 0 back, which disarms it.
let checksUntilPoll = POLL_CHECKS;
let armed = false;
const sigint = {
  get 0() {
    return 2;
  },
  set 0(_cleared) {
    armed = false;
  },
};
Object.defineProperty(pyodide._module, "Py_EmscriptenSignalBuffer", {
  get() {
    if (armed) return sigint;
    if (--checksUntilPoll > 0) return undefined;
    checksUntilPoll = POLL_CHECKS;
    armed = interruptDue();
    return armed ? sigint : undefined;
  },
});
const sleeper = new Int32Array(new SharedArrayBuffer(4)); // for Atomics.wait: never woken

const memoryBytes = () => pyodide._module.HEAP8.buffer.byteLength;
// One reply per request: set once the current request's reply is written (see the loop).
let replied = false;
// Every frame sent during a request names it (the supervisor refuses another request's): the
// guest's JSON object with the request's number added last, so that it wins over any other.
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
    const until = performance.now() + ms;
    for (;;) {
      if (interruptDue()) return true;
      const left = until - performance.now();
      if (left <= 0) return false;
      Atomics.wait(sleeper, 0, 0, Math.min(left, SLEEP_SLICE_MS));
    }
  },
  // The guest raised KeyboardInterrupt itself (its sleep saw the interrupt, or the supervisor
  // answered an llm call with "interrupted"): this request is interrupted, once.
  clear_interrupt() {
    armed = false;
    interruptedSeq = currentSeq;
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
writeFrame({ op: "ready", pyodide_version: version, memory_bytes: memoryBytes(), snapshot: restored });

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
  replied = false;
  armed = false;
  currentSeq = header.seq ?? 0;
  // The first check polls: an interrupt written before this request was read (the supervisor
  // sent it after its deadline) stops it as soon as it runs Python.
  checksUntilPoll = 1;
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
    currentSeq = 0;
  }
}
Deno.exit(0);
