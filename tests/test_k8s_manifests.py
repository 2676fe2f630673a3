"""deploy/k8s: every overlay renders, validates strictly, and keeps the policies it claims.

No cluster runs here. Each overlay is rendered by `tests.support.kustomize` (checked against
`kubectl kustomize` where kubectl is installed), validated against the Kubernetes schemas by
`kubernetes-validate --strict` (offline: the schemas ship in the package), and then read:
security contexts, who gets which Secret, probes and resources, disruption budgets and
autoscalers, the RLM_* names, and the network graph the NetworkPolicies allow, computed by
a small evaluator over their selectors and ports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from pydantic import AliasChoices

from rlm_cli.config_docs import SETTINGS_CLASSES, load
from rlm_cli.main import cli
from tests.support.kustomize import Object, identity, merge, render

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("remote", "sidecar", "remote-external-redis")
COMPONENT = "app.kubernetes.io/component"
RLM_UID = 10001  # the Dockerfile's `rlm` user
#: The oldest Kubernetes the manifests are meant for, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
#: What the LLM egress rule must keep out of reach: private, CGNAT, link-local (cloud
#: metadata) and loopback ranges.
CLUSTER_RANGES = {
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "127.0.0.0/8",
}  # fmt: skip
INTERNET = "internet"
DNS = "dns"
SERVE_CLIENTS = "serve-clients"
TCP = "TCP"

Edge = tuple[str, str, str, int]  # (from, to, protocol, port)


def rendered(overlay: str) -> list[Object]:
    return render(K8S / "overlays" / overlay)


def workloads(objects: list[Object]) -> list[Object]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: Object) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(objects: list[Object]) -> Iterator[tuple[Object, dict[str, Any]]]:
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            yield workload, container


def component(workload: Object) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"][COMPONENT])


def is_rlm(container: Mapping[str, Any]) -> bool:
    return str(container["image"]).startswith("rlm-broker:")


# --- rendering and schemas -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    directory = K8S / "overlays" / overlay
    printed = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert sorted(yaml.safe_load_all(printed), key=identity) == sorted(
        rendered(overlay), key=identity
    )


def validate(
    objects: list[Object], directory: Path, version: str = "1.37.0"
) -> subprocess.CompletedProcess[str]:
    path = directory / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    validator = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(validator), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True, text=True, check=False, timeout=90,
    )  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str, version: str, tmp_path: Path) -> None:
    done = validate(rendered(overlay), tmp_path, version)
    assert done.returncode == 0, done.stdout + done.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    broker = next(o for o in rendered("remote") if identity(o)[2] == "rlm-broker")
    broken = merge(broker, {"spec": {"template": {"spec": {"runAsNonRoot": True}}}})
    done = validate([broken], tmp_path)
    assert done.returncode != 0
    assert "runAsNonRoot" in done.stdout + done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_are_in_the_manifests(overlay: str) -> None:
    assert not [o for o in rendered(overlay) if o["kind"] == "Secret"]


# --- pods ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_and_unprivileged(overlay: str) -> None:
    for workload, container in containers(rendered(overlay)):
        pod = pod_spec(workload)
        where = f"{identity(workload)[2]}/{container['name']}"
        effective = {**pod["securityContext"], **container["securityContext"]}
        assert effective["runAsNonRoot"] is True, where
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
        assert not container["securityContext"].get("privileged"), where
        assert pod["automountServiceAccountToken"] is False, where
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not pod.get("shareProcessNamespace"), where
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, where
        if is_rlm(container):
            assert effective["runAsUser"] == RLM_UID, where
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        writable |= {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        for mount in container["volumeMounts"]:
            if mount["mountPath"] in ("/tmp", "/data"):
                assert mount["name"] in writable, f"{where}: {mount['mountPath']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_requests_and_limits(overlay: str) -> None:
    for workload, container in containers(rendered(overlay)):
        where = f"{identity(workload)[2]}/{container['name']}"
        assert "readinessProbe" in container, where
        assert "livenessProbe" in container, where
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, where


def test_http_probes_name_the_services_health_endpoints() -> None:
    objects = rendered("remote")
    paths = {
        (identity(w)[2], probe): c[probe]["httpGet"]["path"]
        for w, c in containers(objects)
        for probe in ("readinessProbe", "livenessProbe")
        if "httpGet" in c[probe]
    }
    assert paths == {
        ("rlm-broker", "readinessProbe"): "/health",
        ("rlm-broker", "livenessProbe"): "/health/live",
        ("rlm-sandbox", "readinessProbe"): "/health",
        ("rlm-sandbox", "livenessProbe"): "/health",
        ("rlm-poller", "readinessProbe"): "/metrics",
        ("rlm-poller", "livenessProbe"): "/metrics",
        ("rlm-serve", "readinessProbe"): "/health",
        ("rlm-serve", "livenessProbe"): "/health",
    }
    from pydantic import SecretStr

    from broker.app import create_app
    from broker.settings import BrokerSettings
    from sandbox_runtime.service.app import create_app as create_runtime_app
    from sandbox_runtime.service.settings import RuntimeSettings

    def paths_of(app: Any) -> set[str]:
        return {str(getattr(route, "path", "")) for route in app.routes}

    broker = create_app(BrokerSettings(redis_url="redis://127.0.0.1:1/0"))
    assert {"/health", "/health/live"} <= paths_of(broker)
    runtime = create_runtime_app(RuntimeSettings(token=SecretStr("probe-check")))
    assert "/health" in paths_of(runtime)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_and_option_exists(overlay: str) -> None:
    context = click.Context(cli)
    for workload, container in containers(rendered(overlay)):
        if not is_rlm(container):
            continue
        where = f"{identity(workload)[2]}/{container['name']}"
        program, name, *args = container["command"]
        assert program == "rlm", where
        command = cli.get_command(context, name)
        assert command is not None, f"{where}: no `rlm {name}`"
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert {a for a in args if a.startswith("--")} <= known, where


def test_the_sidecar_runtime_listens_on_the_pods_loopback_only() -> None:
    objects = rendered("sidecar")
    for name, host in (("rlm-poller", "poller"), ("rlm-serve", "serve")):
        workload = next(w for w in workloads(objects) if identity(w)[2] == name)
        by_name = {c["name"]: c for c in pod_spec(workload)["containers"]}
        assert set(by_name) == {host, "sandbox"}
        sandbox = by_name["sandbox"]
        assert sandbox["command"][:2] == ["rlm", "sandbox"]
        assert sandbox["command"][sandbox["command"].index("--host") + 1] == "127.0.0.1"
        assert "ports" not in sandbox
        env = {e["name"]: e.get("value") for e in by_name[host]["env"]}
        assert env["RLM_RUNTIME_URL"] == "http://127.0.0.1:8100"
        assert env["RLM_ENVIRONMENT"] == "pyodide"
    assert not [w for w in workloads(objects) if component(w) == "sandbox"]


# --- secrets ---------------------------------------------------------------------------


def secret_users(objects: list[Object]) -> dict[str, set[str]]:
    """Secret name -> the containers (workload/container) that can read it."""
    users: dict[str, set[str]] = {}
    for workload, container in containers(objects):
        where = f"{component(workload)}/{container['name']}"
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                users.setdefault(ref["name"], set()).add(where)
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                users.setdefault(source["secretRef"]["name"], set()).add(where)
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume and volume["name"] in mounted:
                users.setdefault(volume["secret"]["secretName"], set()).add(where)
    return users


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_secret_reaches_only_the_containers_that_need_it(overlay: str) -> None:
    users = secret_users(rendered(overlay))
    assert users["rlm-llm-api-key"] == {"poller/poller", "serve/serve"}
    assert users["rlm-admin-token"] == {"broker/broker", "poller/poller"}
    assert users["rlm-serve-tenant-token"] == {"serve/serve"}
    assert users["rlm-serve-api-keys"] == {"serve/serve"}
    runtime = {"sandbox/sandbox"} if overlay != "sidecar" else {"poller/sandbox", "serve/sandbox"}
    assert users["rlm-sandbox-token"] == {"poller/poller", "serve/serve", *runtime}
    if overlay == "remote-external-redis":
        assert users.pop("rlm-redis-url") == {"broker/broker"}
    assert set(users) == {
        "rlm-llm-api-key", "rlm-admin-token", "rlm-serve-tenant-token", "rlm-serve-api-keys",
        "rlm-sandbox-token",
    }  # fmt: skip


# --- scaling ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_broker_and_runtime_have_a_disruption_budget_and_an_autoscaler(overlay: str) -> None:
    objects = rendered(overlay)
    runtime = "rlm-poller" if overlay == "sidecar" else "rlm-sandbox"
    by_name = {identity(w)[2]: w for w in workloads(objects)}
    for name in ("rlm-broker", runtime):
        labels = by_name[name]["spec"]["template"]["metadata"]["labels"]
        budgets = [
            o for o in objects
            if o["kind"] == "PodDisruptionBudget"
            and o["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]  # fmt: skip
        assert len(budgets) == 1, name
        scalers = [
            o for o in objects
            if o["kind"] == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name
            }
        ]  # fmt: skip
        assert len(scalers) == 1, name
        assert scalers[0]["spec"]["minReplicas"] >= 2, name
        assert budgets[0]["spec"]["minAvailable"] < scalers[0]["spec"]["minReplicas"], name


# --- configuration names -----------------------------------------------------------------


def known_variables() -> set[str]:
    names: set[str] = set()
    for _, path in SETTINGS_CLASSES:
        cls = load(path)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, field in cls.model_fields.items():
            names.add((prefix + name).upper())
            alias = field.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif isinstance(alias, AliasChoices):
                names.update(str(choice).upper() for choice in alias.choices)
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_is_a_real_setting(overlay: str) -> None:
    objects = rendered(overlay)
    profiles = next(o for o in objects if o["kind"] == "ConfigMap")
    key_variables = {p["api_key_env"] for p in json.loads(profiles["data"]["profiles.json"])}
    known = known_variables() | key_variables
    for workload, container in containers(objects):
        if not is_rlm(container):
            continue
        unknown = {e["name"] for e in container["env"]} - known
        assert not unknown, f"{identity(workload)[2]}/{container['name']}: {sorted(unknown)}"


# --- network policies --------------------------------------------------------------------


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        ok = {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels.get(key) not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def external(peer: Mapping[str, Any]) -> str | None:
    """The name of a peer outside this namespace's pods, or None for a pod peer."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        if block["cidr"] == "0.0.0.0/0" and set(block.get("except", [])) >= CLUSTER_RANGES:
            return INTERNET
        return f"ipBlock {block['cidr']}"
    if "namespaceSelector" in peer:
        namespaces = peer["namespaceSelector"].get("matchLabels", {})
        pods = peer.get("podSelector", {}).get("matchLabels", {})
        if namespaces == {"kubernetes.io/metadata.name": "kube-system"} and pods == {
            "k8s-app": "kube-dns"
        }:
            return DNS
        if not namespaces and pods == {"rlm-broker.dev/serve-client": "true"}:
            return SERVE_CLIENTS
        raise AssertionError(f"a peer this evaluator does not know: {peer}")
    return None


def rule_ports(rule: Mapping[str, Any]) -> list[tuple[str, int]]:
    assert "ports" in rule, f"a rule allows every port: {rule}"
    return [(p.get("protocol", TCP), int(p["port"])) for p in rule["ports"]]


def allowed_graph(objects: list[Object]) -> set[Edge]:
    """Every (from, to, protocol, port) the policies allow; pods named by their component."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {component(w): w["spec"]["template"]["metadata"]["labels"] for w in workloads(objects)}

    def rules(labels: Mapping[str, str], direction: str) -> Iterator[dict[str, Any]]:
        for policy in policies:
            if selects(policy["spec"]["podSelector"], labels):
                yield from policy["spec"].get(direction.lower(), [])

    for labels in pods.values():  # default-deny isolates every pod both ways
        assert any(
            selects(p["spec"]["podSelector"], labels)
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")
            for p in policies
        )  # fmt: skip
    egress: set[Edge] = set()
    ingress: set[Edge] = set()
    for name, labels in pods.items():
        for rule in rules(labels, "Egress"):
            for peer in rule["to"]:
                outside = external(peer)
                targets = (
                    [outside]
                    if outside
                    else [n for n, lab in pods.items() if selects(peer["podSelector"], lab)]
                )
                egress |= {(name, t, *port) for t in targets for port in rule_ports(rule)}
        for rule in rules(labels, "Ingress"):
            for peer in rule["from"]:
                outside = external(peer)
                sources = (
                    [outside]
                    if outside
                    else [n for n, lab in pods.items() if selects(peer["podSelector"], lab)]
                )
                ingress |= {(s, name, *port) for s in sources for port in rule_ports(rule)}
    inside = {(a, b, proto, port) for a, b, proto, port in egress if b in pods} & ingress
    out = {edge for edge in egress if edge[1] not in pods}
    into = {edge for edge in ingress if edge[0] not in pods}
    return inside | out | into


def dns_edges(*names: str) -> set[Edge]:
    return {(n, DNS, proto, 53) for n in names for proto in ("UDP", TCP)}


REMOTE_GRAPH: set[Edge] = {
    ("poller", "broker", TCP, 8000),
    ("serve", "broker", TCP, 8000),
    ("sandbox", "broker", TCP, 8000),
    ("broker", "redis", TCP, 6379),
    ("serve", "serve-redis", TCP, 6379),
    ("poller", "sandbox", TCP, 8100),
    ("serve", "sandbox", TCP, 8100),
    ("poller", INTERNET, TCP, 443),
    ("serve", INTERNET, TCP, 443),
    (SERVE_CLIENTS, "serve", TCP, 8200),
    *dns_edges("broker", "poller", "sandbox", "serve"),
}
EXPECTED_GRAPHS = {
    "remote": REMOTE_GRAPH,
    # The runtime is a container of the poller's and serve's pods: it has their edges.
    "sidecar": {e for e in REMOTE_GRAPH if "sandbox" not in e},
    "remote-external-redis": {e for e in REMOTE_GRAPH if "redis" not in e}
    | {("broker", "ipBlock 192.0.2.10/32", TCP, port) for port in (6379, 6380)},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policies_allow_exactly_the_intended_edges(overlay: str) -> None:
    graph = allowed_graph(rendered(overlay))
    assert graph == EXPECTED_GRAPHS[overlay]
    # the claims, as the guide states them
    assert {to for src, to, *_ in graph if src == "sandbox"} <= {"broker", DNS}
    assert {src for src, to, *_ in graph if to == INTERNET} == {"poller", "serve"}
    assert {src for src, to, *_ in graph if to == "redis"} <= {"broker"}
    assert {src for src, to, *_ in graph if to == "serve-redis"} == {"serve"}


def test_the_evaluator_sees_a_widened_policy() -> None:
    objects = rendered("remote")
    widened = [
        merge(o, {"spec": {"ingress": [{"from": [{"podSelector": {}}], "ports": [
            {"protocol": TCP, "port": 6379}]}]}})
        if identity(o)[2] == "redis-ingress" else o
        for o in objects
    ]  # fmt: skip
    graph = allowed_graph(widened)
    assert ("sandbox", "redis", TCP, 6379) not in graph  # the sandbox's egress still says no
    assert ("poller", "redis", TCP, 6379) not in graph
    assert ("broker", "redis", TCP, 6379) in graph
    opened = [
        merge(o, {"spec": {"egress": [{"to": [{"podSelector": {}}], "ports": [
            {"protocol": TCP, "port": 6379}]}]}})
        if identity(o)[2] == "sandbox-egress" else o
        for o in widened
    ]  # fmt: skip
    assert ("sandbox", "redis", TCP, 6379) in allowed_graph(opened)
