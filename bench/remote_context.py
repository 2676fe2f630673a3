"""Measures what the remote placement sends per execution over a big context, before and
after the runtime's context cache: `python bench/remote_context.py [--mb 35] [--runs 4]`.

Starts a real runtime (in this process, real Pyodide sandboxes) and runs the same code
`--runs` times over one context of `--mb` MB, two ways:
- inline (before the cache): the first `POST /execute` carries the context, and from then on
  it travels inside the namespace blob, in every request and every response;
- cached (now): the context is uploaded once (`PUT /contexts/{sha256}`), each request names
  it by hash and the blob leaves it out.
Prints, per execution after the first: request bytes, response bytes and wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import string
import time

from pydantic import SecretStr

from rlm_wire import runtime_models as p
from rlm_wire.runtime_client import RuntimeClient, context_content
from sandbox_runtime.service.serve import BackgroundRuntime
from sandbox_runtime.service.settings import RuntimeSettings

TOKEN = "bench-context-token"
CODE = "n = len(context)\nprint(n)"
LIMITS = p.Limits(timeout_s=120)


async def _inline(client: RuntimeClient, context: str, runs: int) -> list[tuple[int, int, float]]:
    rows: list[tuple[int, int, float]] = []
    snapshot: str | None = None
    for turn in range(runs):
        body = p.StatelessExecuteRequest(
            code=CODE, snapshot=snapshot, context=context if turn == 0 else None, limits=LIMITS
        )
        sent = len(body.model_dump_json(exclude_none=True))
        started = time.perf_counter()
        response = await client.execute_stateless(body)
        rows.append((sent, len(response.snapshot), time.perf_counter() - started))
        snapshot = response.snapshot
    return rows


async def _cached(client: RuntimeClient, context: str, runs: int) -> list[tuple[int, int, float]]:
    content, digest = await asyncio.to_thread(context_content, context)
    started = time.perf_counter()
    await client.put_context(digest, content)
    print(f"  upload once: {len(content) / 1e6:.1f} MB in {time.perf_counter() - started:.2f} s")
    refs = [p.ContextRef(index=0, sha256=digest)]
    rows: list[tuple[int, int, float]] = []
    snapshot: str | None = None
    for _ in range(runs):
        body = p.StatelessExecuteRequest(code=CODE, snapshot=snapshot, contexts=refs, limits=LIMITS)
        sent = len(body.model_dump_json(exclude_none=True))
        started = time.perf_counter()
        response = await client.execute_with_contexts(body, {digest: content})
        rows.append((sent, len(response.snapshot), time.perf_counter() - started))
        snapshot = response.snapshot
    return rows


def _size(count: float) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count:,.0f} bytes"


def _report(name: str, rows: list[tuple[int, int, float]]) -> None:
    later = rows[1:] or rows
    print(
        f"  {name}: first call sent {_size(rows[0][0])} in {rows[0][2]:.2f} s; then per "
        f"execution sent {_size(statistics.mean(r[0] for r in later))}, got back "
        f"{_size(statistics.mean(r[1] for r in later))}, "
        f"{statistics.median(r[2] for r in later):.2f} s (median of {len(later)})"
    )


async def _main(mb: int, runs: int) -> None:
    # Text that compresses about as well as prose (3:1), not a repeated line that
    # compresses to nothing: the blob's size is what the inline way pays for.
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    context = " ".join(rng.choices(words, k=mb * 10**6 // 6))[: mb * 10**6]
    settings = RuntimeSettings(
        token=SecretStr(TOKEN), port=0, pool_size=2, max_concurrent_spawns=2, hibernate_after_s=0
    )
    with BackgroundRuntime(settings) as runtime:
        async with RuntimeClient(runtime.url, TOKEN, timeout_s=120) as client:
            print(f"context: {len(context) / 1e6:.1f} MB, {runs} executions each")
            _report("inline (before)", await _inline(client, context, runs))
            _report("cached (now)   ", await _cached(client, context, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=35, help="context size in MB")
    parser.add_argument("--runs", type=int, default=4, help="executions per way")
    args = parser.parse_args()
    asyncio.run(_main(args.mb, args.runs))


if __name__ == "__main__":
    main()
