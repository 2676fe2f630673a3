"""The "local" environment: model code runs in the host process. Trusted code only.

For development and benchmarks. The code gets the same REPL as in a sandbox (`rlm_repl.Repl`,
the one every environment runs, calling the broker over HTTP with the session token), but
nothing stands between it and the host: its files, its environment, its API keys.

Each environment runs its code on its own thread, so that sub-RLMs executing at the same
time in one process (the poller runs them) never wait for a shared thread pool. Output is
captured per thread and capped. The timeout is best-effort: a KeyboardInterrupt is raised
in the code's thread, which stops Python loops but not a blocking C call; an execution
that will not stop keeps its thread busy, and the next `execute` waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from pydantic import JsonValue

from host_poller.environments.base import Environment, EnvironmentSpec, register_environment
from host_poller.environments.errors import EnvironmentStateError
from host_poller.settings import HostSettings
from rlm_repl import DEFAULT_OUTPUT_MAX_BYTES, HttpTransport, Repl
from rlm_wire.runtime_models import Context, ExecutionResult


class LocalEnvironment(Environment):
    """Executes code with `exec` in this process, on a thread of its own."""

    name = "local"

    def __init__(self, settings: HostSettings) -> None:
        self._settings = settings
        self._repl: Repl | None = None
        self._transport: HttpTransport | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._default_timeout_s: float | None = settings.execution_timeout_s

    async def start(self, spec: EnvironmentSpec) -> None:
        if self._repl is not None:
            raise EnvironmentStateError("local environment already started")
        self._transport = HttpTransport(
            spec.broker_url,
            spec.session_token,
            timeout_s=self._settings.broker_timeout_s,
            wait_s=self._settings.broker_wait_s,
            retry=self._settings.retry_policy(),
        )
        self._repl = Repl(
            self._transport,
            depth=spec.depth,
            max_depth=spec.max_depth,
            state=spec.state,
            state_max_bytes=self._settings.state_max_bytes,
            output_max_bytes=spec.limits.output_bytes or DEFAULT_OUTPUT_MAX_BYTES,
        )
        if spec.limits.timeout_s is not None:
            self._default_timeout_s = spec.limits.timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"rlm-local-d{spec.depth}"
        )

    def _started(self) -> tuple[Repl, concurrent.futures.ThreadPoolExecutor]:
        if self._repl is None or self._executor is None:
            raise EnvironmentStateError("local environment is not started (or closed)")
        return self._repl, self._executor

    async def load_context(self, context: Context, index: int = 0) -> None:
        repl, _ = self._started()
        repl.load_context(context, index)

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        repl, executor = self._started()
        limit = timeout_s if timeout_s is not None else self._default_timeout_s
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(executor, repl.execute, code, limit)
        return ExecutionResult.model_validate(outcome)

    async def get_state(self) -> dict[str, JsonValue]:
        repl, _ = self._started()
        state: dict[str, JsonValue] = repl.snapshot_state()
        return state

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        transport, self._transport = self._transport, None
        self._repl = None
        if executor is not None:
            # A runaway execution may still hold the thread: do not wait for it.
            executor.shutdown(wait=False, cancel_futures=True)
        if transport is not None:
            transport.close()


register_environment(LocalEnvironment.name, LocalEnvironment)
