// Interrupt watcher: a thread that blocks on the interrupt pipe while the main thread runs
// Python. The supervisor writes the 4-byte sequence number of the request to interrupt; if it
// is still the one running, SIGINT (2) goes into Pyodide's interrupt buffer (KeyboardInterrupt)
// and a patched time.sleep waiting on that buffer wakes up. Stale numbers are ignored. The
// number is also left in flags[2]: a request whose deadline passed before the main thread read
// it (the supervisor was late to send it) finds its interrupt there when it starts.

self.onmessage = (event) => {
  const { sab, path } = event.data;
  // [0] = pending signal, [1] = sequence number running, [2] = last sequence number interrupted
  const flags = new Int32Array(sab);
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
    Atomics.store(flags, 2, seq); // before reading [1]: host.mjs stores [1], then reads [2]
    if (seq === Atomics.load(flags, 1)) {
      Atomics.store(flags, 0, 2);
      Atomics.notify(flags, 0);
    }
  }
};
