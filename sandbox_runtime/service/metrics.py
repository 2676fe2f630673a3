"""Prometheus metrics of one runtime replica, in a private registry served at /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rlm_wire.runtime_models import ExecutionResult

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Counters and histograms the service updates; gauges are read from callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.executions = Counter(
            "rlm_sandbox_executions", "Executions by outcome.", ["outcome"], registry=r
        )
        self.execution_seconds = Histogram(
            "rlm_sandbox_execution_seconds",
            "Wall clock of executions.",
            buckets=_SECONDS,
            registry=r,
        )
        self.spawns = Counter("rlm_sandbox_spawns", "Sandbox processes started.", registry=r)
        self.spawn_seconds = Histogram(
            "rlm_sandbox_spawn_seconds",
            "Start-up time of sandboxes from the snapshot.",
            buckets=_SECONDS,
            registry=r,
        )
        self.restarts = Counter(
            "rlm_sandbox_restarts", "Sandboxes replaced after a crash or a kill.", registry=r
        )
        self.hibernations = Counter("rlm_sandbox_hibernations", "Sessions hibernated.", registry=r)
        self.restores = Counter("rlm_sandbox_restores", "Sessions restored.", registry=r)
        self.sessions_created = Counter(
            "rlm_sandbox_sessions_created", "Sessions created.", registry=r
        )
        self.sessions_ended = Counter(
            "rlm_sandbox_sessions_ended", "Sessions ended, by reason.", ["reason"], registry=r
        )
        self.memory_hibernations = Counter(
            "rlm_sandbox_memory_hibernations",
            "Idle sessions hibernated to keep the sandboxes within the memory budget.",
            registry=r,
        )
        self.memory_refusals = Counter(
            "rlm_sandbox_memory_refusals",
            "Sandboxes refused (503 sandbox_memory_exhausted): no room in the memory budget.",
            registry=r,
        )
        self.llm_calls = Counter(
            "rlm_sandbox_llm_calls", "Prompts carried to the broker.", ["kind"], registry=r
        )

    def observe_execution(self, result: ExecutionResult, seconds: float) -> None:
        """Count one execution (session or stateless) by outcome, and its wall clock."""
        if result.state_lost:
            outcome = "state_lost"
        elif result.error is None:
            outcome = "ok"
        elif result.error.type in ("TimeoutError", "KeyboardInterrupt"):
            outcome = "timeout"
        else:
            outcome = "error"
        self.executions.labels(outcome=outcome).inc()
        self.execution_seconds.observe(seconds)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from `read` at each scrape."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
