"""Prometheus metrics of one poller, in a private registry, served by `rlm poller --metrics-port`.

    rlm_poller_in_flight                      requests leased and not answered yet (gauge)
    rlm_poller_running                        requests being worked on now (gauge)
    rlm_poller_requests_fetched_total         requests leased from the broker
    rlm_poller_requests_total{outcome,code}   requests finished: done / error (with its code) /
                                              abandoned (given up at shutdown)
    rlm_poller_leases_handed_back_total       of the abandoned, those the broker delivers again
                                              at once (the others wait out their lease)
    rlm_poller_leases_lost_total{when}        leases lost: in_flight (the call was cancelled)
                                              or before_start (the request never started)
    rlm_poller_broker_outages_total           times the broker became unreachable
    rlm_poller_broker_failovers_total         times the poller moved on to another broker URL
    rlm_poller_broker_reachable               1, or 0 during an outage (gauge)
    rlm_poller_llm_call_seconds{model}        latency of each LLM call, retries included
    rlm_poller_llm_calls_total{model,outcome} LLM calls: ok, or the error code
    rlm_poller_llm_tokens_total{model,direction}  input / output tokens
    rlm_poller_llm_cost_usd_total{model}      cost of the LLM calls

The poller's counters are read from `Poller.stats` and `Poller.link` at scrape time; LLM calls
are observed by wrapping each client (`instrument`), so the sub-RLMs' own root-model calls
made by this process are counted too. Labels never carry tenants, sessions or prompts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from host_poller.llm.errors import LLMError
from host_poller.llm.types import Completion, LLMClient, Message
from host_poller.poller.answers import error_code

if TYPE_CHECKING:
    from host_poller.poller.poller import Poller

logger = logging.getLogger(__name__)

#: LLM latency buckets (seconds): from a cached local model to a slow reasoning call.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class PollerMetrics:
    """The metrics of one poller; `bind` it to the poller, `instrument` its LLM clients."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.llm_latency = Histogram(
            "rlm_poller_llm_call_seconds",
            "Latency of each LLM call made by this poller, retries included.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.llm_calls = Counter(
            "rlm_poller_llm_calls",
            "LLM calls made by this poller: ok, or the error code of the failure.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "rlm_poller_llm_tokens",
            "Tokens of the LLM calls made by this poller.",
            ["model", "direction"],
            registry=self.registry,
        )
        self.llm_cost = Counter(
            "rlm_poller_llm_cost_usd",
            "Cost in USD of the LLM calls made by this poller.",
            ["model"],
            registry=self.registry,
        )
        self._poller: Poller | None = None
        self.registry.register(_PollerCollector(self))

    def bind(self, poller: Poller) -> None:
        """Export this poller's stats (in flight, outcomes, outages)."""
        self._poller = poller

    @property
    def poller(self) -> Poller | None:
        return self._poller

    def instrument(self, client: LLMClient) -> LLMClient:
        """`client`, with each call's latency, outcome, tokens and cost recorded here."""
        return InstrumentedClient(client, self)

    def observe_completion(self, model: str, completion: Completion, latency_s: float) -> None:
        """One successful call; `model` is the client's (its profile's), so labels stay few."""
        self.llm_latency.labels(model).observe(latency_s)
        self.llm_calls.labels(model, "ok").inc()
        usage = completion.usage
        self.llm_tokens.labels(model, "input").inc(usage.input_tokens)
        self.llm_tokens.labels(model, "output").inc(usage.output_tokens)
        self.llm_cost.labels(model).inc(usage.cost_usd)

    def observe_failure(self, model: str, exc: BaseException, latency_s: float) -> None:
        self.llm_latency.labels(model).observe(latency_s)
        self.llm_calls.labels(model, error_code(exc)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve `/metrics` on a thread of its own (prometheus_client's WSGI server)."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        server = MetricsServer(httpd, thread)
        logger.info("metrics endpoint started", extra={"host": host, "port": server.port})
        return server


class MetricsServer:
    """A running metrics endpoint; `close()` stops it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class InstrumentedClient:
    """An `LLMClient` that records each call in `PollerMetrics`."""

    def __init__(self, client: LLMClient, metrics: PollerMetrics) -> None:
        self._client = client
        self._metrics = metrics
        self.model = client.model

    async def complete(
        self, messages: Sequence[Message], *, params: Mapping[str, Any] | None = None
    ) -> Completion:
        started = time.perf_counter()
        try:
            completion = await self._client.complete(messages, params=params)
        except LLMError as exc:
            self._metrics.observe_failure(self.model, exc, time.perf_counter() - started)
            raise
        self._metrics.observe_completion(self.model, completion, time.perf_counter() - started)
        return completion

    async def aclose(self) -> None:
        await self._client.aclose()


class _PollerCollector(Collector):
    """Reads the bound poller's counters at scrape time (from the metrics server's thread).

    The poller's event loop updates them meanwhile: plain ints are read whole, and the
    outcome counter is copied with one `dict()` call, which the GIL keeps whole too.
    """

    def __init__(self, metrics: PollerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        poller = self._metrics.poller
        if poller is None:
            return
        stats = poller.stats
        yield GaugeMetricFamily(
            "rlm_poller_in_flight",
            "Requests leased by this poller and not answered yet.",
            value=poller.in_flight,
        )
        yield GaugeMetricFamily(
            "rlm_poller_running", "Requests being answered right now.", value=stats.running
        )
        yield CounterMetricFamily(
            "rlm_poller_requests_fetched",
            "Requests leased from the broker.",
            value=stats.fetched,
        )
        outcomes = CounterMetricFamily(
            "rlm_poller_requests",
            "Requests finished by outcome (done, error, abandoned) and error code.",
            labels=["outcome", "code"],
        )
        for code, count in dict(stats.outcomes).items():
            outcome = "done" if code == "done" else "error"
            outcomes.add_metric([outcome, "" if code == "done" else code], count)
        outcomes.add_metric(["abandoned", ""], stats.abandoned)
        yield outcomes
        yield CounterMetricFamily(
            "rlm_poller_leases_handed_back",
            "Leases of requests given up at shutdown, handed back to the broker to deliver "
            "again at once.",
            value=stats.handed_back,
        )
        lost = CounterMetricFamily(
            "rlm_poller_leases_lost",
            "Leases lost (redelivered by the broker): calls cancelled in flight, or never started.",
            labels=["when"],
        )
        lost.add_metric(["in_flight"], stats.leases_lost)
        lost.add_metric(["before_start"], stats.expired_before_start)
        yield lost
        yield CounterMetricFamily(
            "rlm_poller_broker_failovers",
            "Times the poller moved on to the next broker URL.",
            value=poller.link.failovers,
        )
        yield CounterMetricFamily(
            "rlm_poller_broker_outages",
            "Times the broker became unreachable.",
            value=poller.link.outages,
        )
        yield GaugeMetricFamily(
            "rlm_poller_broker_reachable",
            "1 when the broker answers, 0 during an outage.",
            value=1 if poller.link.reachable else 0,
        )
