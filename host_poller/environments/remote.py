"""The "remote" environment: stateless executions on a scaled `rlm sandbox` runtime.

Nothing stays on the runtime between calls but its cache of contexts: each `POST /execute`
carries the namespace blob the previous one returned (and the `state`), so any replica can
serve any call. A context is hashed once at `load_context` and uploaded once
(`PUT /contexts/{sha256}`); each execution names it by hash and the blob leaves it out, so
it never travels again. A replica that does not hold it (a new one, or it was evicted)
answers 409 `context_unknown` and the client uploads it again, once, and retries.
"""

from __future__ import annotations

import asyncio

from host_poller.environments._runtime import (
    RuntimeEnvironment,
    broker_access,
    translated,
)
from host_poller.environments.base import register_environment
from host_poller.settings import HostSettings
from rlm_wire.runtime_client import RuntimeClient, context_content
from rlm_wire.runtime_models import (
    Context,
    ContextRef,
    ExecutionResult,
    StatelessExecuteRequest,
)


class RemoteEnvironment(RuntimeEnvironment):
    """Runs each execution on any runtime replica, carrying the namespace in the request."""

    name = "remote"

    def __init__(self, settings: HostSettings) -> None:
        super().__init__(settings)
        self._snapshot: str | None = None
        # index -> (sha256, the uploaded JSON bytes: kept to upload again on a miss)
        self._loaded: dict[int, tuple[str, bytes]] = {}
        # Indexes loaded since the last blob: bound anew even if the blob holds that index.
        self._fresh: set[int] = set()

    async def _close(self, client: RuntimeClient) -> None:
        self._snapshot = None
        self._loaded.clear()

    async def load_context(self, context: Context, index: int = 0) -> None:
        client, _ = self._started()
        content, digest = await asyncio.to_thread(context_content, context)
        with translated("could not upload the context"):
            await client.put_context(digest, content)
        self._loaded[index] = (digest, content)
        self._fresh.add(index)

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        client, spec = self._started()
        refs = [
            ContextRef(index=index, sha256=digest, fresh=index in self._fresh)
            for index, (digest, _) in sorted(self._loaded.items())
        ]
        body = StatelessExecuteRequest(
            code=code,
            snapshot=self._snapshot,
            contexts=refs or None,
            broker=broker_access(spec),
            limits=spec.limits.model_copy(update={"timeout_s": self._timeout(timeout_s)}),
            state=self._state,
        )
        contents = {digest: content for digest, content in self._loaded.values()}
        with translated("execution failed in the runtime"):
            response = await client.execute_with_contexts(body, contents)
        # On `state_lost` the runtime returned our previous blob: the fresh ones stay fresh.
        if not response.result.state_lost:
            self._fresh.clear()
        self._snapshot = response.snapshot or self._snapshot
        return self._keep_state(response.result)


register_environment(RemoteEnvironment.name, RemoteEnvironment)
