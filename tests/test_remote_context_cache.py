"""The runtime's content-addressed context cache, and the "remote" environment over it: a
real runtime on loopback with real Pyodide sandboxes (no llm_query here, so no broker)."""

from __future__ import annotations

import base64
import hashlib
import pickle
import re
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from host_poller.environments import Environment, EnvironmentSpec, create_environment
from host_poller.settings import HostSettings
from rlm_wire import runtime_models as p
from rlm_wire.errors import ApiError, ServiceResponseError
from rlm_wire.runtime_client import RuntimeClient, context_content
from sandbox_runtime.guest import namespace
from sandbox_runtime.guest.session import Session
from sandbox_runtime.service.context_cache import ContextCache
from sandbox_runtime.service.metrics import Metrics
from sandbox_runtime.service.serve import BackgroundRuntime
from sandbox_runtime.service.settings import RuntimeSettings
from tests.test_sandbox_worker_guest import FakeHost

pytestmark = pytest.mark.anyio

TOKEN = "context-cache-token"
_MiB = 2**20


def _runtime(**overrides: Any) -> BackgroundRuntime:
    fields: dict[str, Any] = {
        "token": SecretStr(TOKEN),
        "port": 0,
        "pool_size": 1,
        "max_concurrent_spawns": 2,
        "hibernate_after_s": 0,
    }
    return BackgroundRuntime(RuntimeSettings(**(fields | overrides)))


@pytest.fixture(scope="module")
def runtime_url() -> Iterator[str]:
    with _runtime() as runtime:
        yield runtime.url


@pytest.fixture(scope="module")
def tiny_cache_url() -> Iterator[str]:
    """A runtime whose cache holds one context: a second upload evicts the first."""
    with _runtime(context_cache_entries=1) as runtime:
        yield runtime.url


@pytest.fixture
async def client(runtime_url: str) -> AsyncIterator[RuntimeClient]:
    async with RuntimeClient(runtime_url, TOKEN) as runtime:
        yield runtime


async def _remote(url: str) -> Environment:
    env = create_environment(
        "remote", HostSettings(runtime_url=url, runtime_token=SecretStr(TOKEN))
    )
    # No code here calls llm_query: the broker is never reached.
    spec = EnvironmentSpec("http://127.0.0.1:9", "unused", 0, 1, p.Limits(timeout_s=60), None)
    await env.start(spec)
    return env


async def _metric(url: str, name: str) -> float:
    async with httpx2.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _blob_size(env: Environment) -> int:
    snapshot: str | None = getattr(env, "_snapshot", None)
    assert snapshot is not None
    return len(base64.b64decode(snapshot))


async def test_context_is_uploaded_once_over_many_executions(runtime_url: str) -> None:
    uploads = await _metric(runtime_url, "rlm_sandbox_context_uploads_total")
    text = "whale " * 200_000  # 1.2 MB
    env = await _remote(runtime_url)
    try:
        await env.load_context(text)
        for turn in range(3):
            result = await env.execute(f"n = len(context.split()) + {turn}\nprint(n)")
            assert result.error is None, result.error
            assert result.stdout == f"{200_000 + turn}\n"
            # The blob carries `n`, never the context.
            assert _blob_size(env) < 20_000
        assert await _metric(runtime_url, "rlm_sandbox_context_uploads_total") == uploads + 1
    finally:
        await env.aclose()


async def test_a_rebound_context_name_is_kept_and_a_reloaded_context_replaces(
    runtime_url: str,
) -> None:
    env = await _remote(runtime_url)
    try:
        await env.load_context({"doc": "first"})
        await env.execute("context = 'mine'")
        kept = await env.execute("print(context, context_0['doc'])")
        assert kept.stdout == "mine first\n", kept.error
        # A new context at the same index is bound anew, over the code's own value too.
        await env.load_context(["second"])
        replaced = await env.execute("print(context, context_0)")
        assert replaced.stdout == "['second'] ['second']\n", replaced.error
        again = await env.execute("print(context is context_0)")
        assert again.stdout == "True\n", again.error
    finally:
        await env.aclose()


async def test_an_evicted_context_is_uploaded_again_transparently(tiny_cache_url: str) -> None:
    env = await _remote(tiny_cache_url)
    try:
        await env.load_context("the first context")
        first = await env.execute("print(context.split()[1])")
        assert first.stdout == "first\n", first.error
        async with RuntimeClient(tiny_cache_url, TOKEN) as other:
            content, digest = context_content("someone else's context")
            await other.put_context(digest, content)  # evicts ours (one entry)
            assert not await other.has_context(context_content("the first context")[1])
        misses = await _metric(tiny_cache_url, "rlm_sandbox_context_misses_total")
        second = await env.execute("print(len(context))")
        assert second.stdout == f"{len('the first context')}\n", second.error
        assert await _metric(tiny_cache_url, "rlm_sandbox_context_misses_total") == misses + 1
    finally:
        await env.aclose()


class _CountingClient(RuntimeClient):
    """The real client, noting which contexts it uploads."""

    uploaded: list[str]

    async def put_context(self, sha256: str, content: bytes) -> None:
        self.uploaded.append(sha256)
        await super().put_context(sha256, content)


async def test_after_a_miss_only_the_contexts_the_replica_lacks_are_uploaded_again() -> None:
    with _runtime(context_cache_entries=2) as runtime:
        async with _CountingClient(runtime.url, TOKEN) as client:
            client.uploaded = []
            (first, first_sha), (second, second_sha) = map(context_content, ["one", "two"])
            contents = {first_sha: first, second_sha: second}
            for sha256, content in contents.items():
                await client.put_context(sha256, content)
            body = p.StatelessExecuteRequest(
                code="print(context_0, context_1)",
                contexts=[
                    p.ContextRef(index=0, sha256=first_sha),
                    p.ContextRef(index=1, sha256=second_sha),
                ],
            )
            first_run = (await client.execute_with_contexts(body, contents)).result
            assert first_run.stdout == "one two\n", first_run.error
            # A third context evicts the least recently used of the two: "one".
            third, third_sha = context_content("three")
            await client.put_context(third_sha, third)
            client.uploaded.clear()
            again = (await client.execute_with_contexts(body, contents)).result
            assert again.stdout == "one two\n", again.error
            assert client.uploaded == [first_sha]


async def test_uploads_are_checked_against_their_hash(client: RuntimeClient) -> None:
    content, digest = context_content({"k": [1, 2]})
    with pytest.raises(ServiceResponseError) as info:
        await client.put_context(digest, content + b" ")
    assert (info.value.status, info.value.code) == (400, "context_hash_mismatch")
    assert not await client.has_context(digest)
    with pytest.raises(ServiceResponseError) as info:
        await client.put_context("NOT-A-HASH", content)
    assert (info.value.status, info.value.code) == (400, "bad_request")
    number = b"42"
    with pytest.raises(ServiceResponseError) as info:
        await client.put_context(hashlib.sha256(number).hexdigest(), number)
    assert (info.value.status, info.value.code) == (422, "invalid_body")
    await client.put_context(digest, content)
    await client.put_context(digest, content)  # again: a no-op
    assert await client.has_context(digest)


async def test_an_unknown_hash_is_409_naming_it(client: RuntimeClient) -> None:
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    body = p.StatelessExecuteRequest(
        code="print(1)", contexts=[p.ContextRef(index=0, sha256=unknown)]
    )
    with pytest.raises(ServiceResponseError) as info:
        await client.execute_stateless(body)
    assert (info.value.status, info.value.code) == (409, "context_unknown")
    assert unknown in info.value.message


async def test_a_snapshot_without_its_context_is_refused(client: RuntimeClient) -> None:
    content, digest = context_content("abc")
    await client.put_context(digest, content)
    refs = [p.ContextRef(index=0, sha256=digest)]
    first = await client.execute_stateless(
        p.StatelessExecuteRequest(code="x = context * 2", contexts=refs)
    )
    assert first.result.error is None, first.result.error
    with pytest.raises(ServiceResponseError) as info:
        await client.execute_stateless(
            p.StatelessExecuteRequest(code="print(x)", snapshot=first.snapshot)
        )
    assert (info.value.status, info.value.code) == (400, "bad_snapshot")
    second = await client.execute_stateless(
        p.StatelessExecuteRequest(code="print(x, context)", snapshot=first.snapshot, contexts=refs)
    )
    assert second.result.stdout == "abcabc abc\n", second.result.error


async def test_a_35_mb_context_runs_through_the_remote_environment(runtime_url: str) -> None:
    line = "the quick brown fox jumps over the lazy dog 0123456789\n"
    text = line * (35 * _MiB // len(line))
    env = await _remote(runtime_url)
    try:
        await env.load_context(text)
        for _ in range(2):
            result = await env.execute("print(len(context), context.count('fox'))")
            assert result.error is None, result.error
            assert result.stdout == f"{len(text)} {text.count('fox')}\n"
            assert _blob_size(env) < 20_000
    finally:
        await env.aclose()


async def test_the_cache_keeps_within_its_bytes_least_recently_used_first() -> None:
    cache = ContextCache(max_bytes=100, max_entries=10, metrics=Metrics())
    entries = [context_content("x" * 38 + str(i)) for i in range(3)]  # 41 bytes each
    for content, digest in entries[:2]:
        assert await cache.put(digest, content)
    cache.resolve([entries[0][1]])  # the first is now the most recently used
    await cache.put(entries[2][1], entries[2][0])
    assert entries[0][1] in cache and entries[2][1] in cache
    assert entries[1][1] not in cache
    assert (len(cache), cache.total_bytes) == (2, 78)  # a string is kept as its text
    big, digest = context_content(["y" * 200])
    with pytest.raises(ApiError) as info:
        await cache.put(digest, big)
    assert (info.value.status, info.value.code) == (413, "payload_too_large")


@pytest.fixture
def guest() -> Iterator[Session]:
    """The guest's session in plain CPython (the rules below need no sandbox process)."""
    main = sys.modules["__main__"]
    try:
        yield Session(FakeHost(), 2**20)
    finally:
        sys.modules["__main__"] = main


def test_a_dump_without_contexts_leaves_out_only_the_loaded_objects(guest: Session) -> None:
    big, other = "x" * 100_000, ["second"]
    namespace.bind_context(guest, big, 0)
    namespace.bind_context(guest, other, 1)
    assert (
        guest.repl.execute("context_1 = 'rebound by the code'\nalias = len(context)")["error"]
        is None
    )
    raw, _ = namespace.dump(guest, contexts=False)
    assert len(raw) < 10_000  # the 100 kB context is not in it
    assert pickle.loads(raw)["contexts"] == {0: ["context_0", "context"], 1: []}

    namespace.load(guest, raw)
    assert guest.context_holes == {0: ["context_0", "context"], 1: []}
    namespace.bind_context(guest, big, 0, rebind=True)
    namespace.bind_context(guest, other, 1, rebind=True)
    namespace.bind_context(guest, {"new": 1}, 2, rebind=True)  # an index new to the blob
    ns = guest.ns
    assert ns["context"] is ns["context_0"] is big
    assert ns["context_1"] == "rebound by the code"  # the code's value is kept
    assert ns["context_2"] == {"new": 1} and ns["alias"] == 100_000

    # With contexts (hibernation), they stay in the blob and are known again after a load.
    kept, _ = namespace.dump(guest)
    namespace.load(guest, kept)
    assert guest.ns["context"] == big and not guest.context_holes
    namespace.bind_context(guest, "ignored: the blob holds index 0", 0, rebind=True)
    assert guest.ns["context"] == big
