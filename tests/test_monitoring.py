"""deploy/monitoring: every alert and dashboard query parses and names only metrics the
services really export (scraped from a real broker, a real poller's registry and a real
sandbox runtime's registry)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx2
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from host_poller.poller.metrics import PollerMetrics
from host_poller.poller.settings import PollerSettings
from sandbox_runtime.service.runtime import Runtime
from sandbox_runtime.service.settings import RuntimeSettings
from sandbox_runtime.worker import WorkerSettings
from tests.support.servers import BrokerServer
from tests.test_poller import make_poller

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
#: Series Prometheus makes itself, not the services.
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("_sum", "_count", ""),
    "unknown": ("",),
}


def series_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce, samples or not (a labelled
    counter with no child yet still declares its family)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture
def exported(broker_server: BrokerServer, tmp_path: Path) -> set[str]:
    broker = httpx2.get(f"{broker_server.url}/metrics", timeout=10).text
    metrics = PollerMetrics()
    settings = PollerSettings(broker_url=broker_server.url, tenant_token="t")
    metrics.bind(make_poller(settings, "http://127.0.0.1:9"))
    poller = metrics.render().decode()
    runtime = Runtime(
        RuntimeSettings(token="t" * 32, hibernation_dir=tmp_path / "h"),
        WorkerSettings(cache_dir=tmp_path / "cache"),
    )
    sandbox = runtime.metrics.render().decode()
    return series_names(broker) | series_names(poller) | series_names(sandbox)


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(rlm_[a-z0-9_]+|up)\b(?=\s*[{\[)\s]|$)", expr))


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_query_parses_and_names_exported_metrics(source: str, exported: set[str]) -> None:
    queries = rule_expressions() if source == "alerts" else dashboard_expressions()
    assert queries
    for name, expr in queries:
        promql_parser.parse(expr)  # raises on a syntax error
        used = metric_names(expr)
        assert used, f"{name}: names no metric"
        unknown = used - exported - PROMETHEUS_OWN
        assert not unknown, f"{name}: {sorted(unknown)} are not exported by any service"


def test_the_alerts_cover_what_an_operator_must_hear_about() -> None:
    alerts = {name for name, _ in rule_expressions()}
    assert {
        "RLMQueueStuck",
        "RLMNoPoller",
        "RLMRedisDown",
        "RLMBrokerErrorRate",
        "RLMSandboxPoolEmpty",
    } <= alerts


def test_prometheus_loads_the_alert_rules_it_is_given() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"rlm-broker", "rlm-sandbox", "rlm-poller"} <= jobs
