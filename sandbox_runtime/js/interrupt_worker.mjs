// Interrupt watcher: a thread that blocks on the interrupt pipe while the main thread runs
// Python. The supervisor writes the 4-byte sequence number of the request to interrupt; if it
// is still the one running, SIGINT (2) goes into Pyodide's interrupt buffer (KeyboardInterrupt)
// and a patched time.sleep waiting on that buffer wakes up. Stale numbers are ignored.

self.onmessage = (event) => {
  const { sab, path } = event.data;
  const flags = new Int32Array(sab); // [0] = pending signal, [1] = sequence number running
  const pipe = Deno.openSync(path, { read: true });
  // This thread allocates nothing more: give back what its start took (V8 would keep it, as
  // in host.mjs, since it blocks on the pipe from now on). Deno runs with --expose-gc.
  globalThis.gc?.({ type: "major", execution: "sync", flavor: "last-resort" });
  self.postMessage("ready");
  const chunk = new Uint8Array(4);
  for (;;) {
    let got = 0;
    while (got < 4) {
      const n = pipe.readSync(chunk.subarray(got));
      if (n === null || n === 0) {
        self.close();
        return;
      }
      got += n;
    }
    const seq = new DataView(chunk.buffer).getInt32(0, false);
    if (seq === Atomics.load(flags, 1)) {
      Atomics.store(flags, 0, 2);
      Atomics.notify(flags, 0);
    }
  }
};
