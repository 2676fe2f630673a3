"""Prometheus metrics of one broker replica, in a private registry served at `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: `requests` children by (endpoint, status): `labels()` costs a lock and a tuple
        #: of strings on every answer otherwise.
        self._answers: dict[tuple[str, int], Counter] = {}
        self.requests = Counter(
            "rlm_broker_http_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "rlm_broker_client_disconnects",
            "Calls whose client hung up before its body arrived (not answered, not errors).",
            ["endpoint"],
            registry=self.registry,
        )
        self.lost_answer_leases = Counter(
            "rlm_broker_lost_answer_leases",
            "Leases handed back at once because their poller never got the /pending answer "
            "that carried them (reported with `abandoned=`).",
            registry=self.registry,
        )
        self.released_leases = Counter(
            "rlm_broker_released_leases",
            "Leases handed back at once by their poller, which will not answer them (its "
            "calls given up at shutdown: POST /leases/release).",
            registry=self.registry,
        )
        self.enqueue_to_respond = Histogram(
            "rlm_broker_enqueue_to_respond_seconds",
            "Time from a request's enqueue to its first accepted answer.",
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                120,
                300,
            ),
            registry=self.registry,
        )
        self.queue_pending = Gauge(
            "rlm_broker_queue_pending", "Requests waiting for a poller.", registry=self.registry
        )
        self.queue_leased = Gauge(
            "rlm_broker_queue_leased", "Requests leased to a poller.", registry=self.registry
        )
        self.queue_oldest_age = Gauge(
            "rlm_broker_queue_oldest_age_seconds",
            "Age of the oldest unanswered request (0 when none): work no poller takes grows it.",
            registry=self.registry,
        )
        self.pollers_last_minute = Gauge(
            "rlm_broker_pollers_last_minute",
            "Pollers (every tenant's and the admin's) that called /pending in the last minute.",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "rlm_broker_redis_up",
            "1 when the last scrape reached Redis, else 0.",
            registry=self.registry,
        )
        self.waiters = Gauge(
            "rlm_broker_waiters",
            "HTTP calls of this replica waiting for an answer.",
            registry=self.registry,
        )

    def count(self, endpoint: str, status: int) -> None:
        """One answer of `endpoint` with `status`, in `rlm_broker_http_requests_total`."""
        child = self._answers.get((endpoint, status))
        if child is None:
            child = self._answers[endpoint, status] = self.requests.labels(endpoint, str(status))
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
