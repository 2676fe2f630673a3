"""The sandbox's isolation layers on this machine, said once, loudly, at start.

Every sandbox process runs under Deno's permissions, a bound on WebAssembly memory and
rlimits wherever the runtime runs. The empty network namespace (`unshare -n`) needs
CAP_SYS_ADMIN, which a container running as a non-root user does not have; with
`RLM_SANDBOX_NETWORK_NAMESPACE=auto` sandboxes then start without it, and this report is
what says so. The report is kept on the runtime (`Runtime.isolation`) for /health.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from sandbox_runtime.worker import WorkerSettings
from sandbox_runtime.worker.launcher import network_namespace_available

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of isolation around each sandbox process, and whether it is in place."""

    name: str
    active: bool
    detail: str


@dataclass(frozen=True, slots=True)
class IsolationReport:
    """The layers this runtime's sandboxes run under."""

    layers: tuple[Layer, ...]

    @property
    def missing(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if not layer.active)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": {
                layer.name: {"active": layer.active, "detail": layer.detail}
                for layer in self.layers
            },
            "missing": [layer.name for layer in self.missing],
        }


def _network_namespace(settings: WorkerSettings) -> Layer:
    name = "network_namespace"
    if settings.network_namespace == "off":
        return Layer(name, False, "switched off (RLM_SANDBOX_NETWORK_NAMESPACE=off)")
    if network_namespace_available():
        return Layer(name, True, "each sandbox runs in an empty network namespace (unshare -n)")
    if shutil.which("unshare") is None:
        reason = "no `unshare` on PATH (util-linux)"
    else:
        reason = "`unshare -n` is refused (it needs CAP_SYS_ADMIN, e.g. root outside a container)"
    if settings.network_namespace == "require":
        return Layer(name, False, f"{reason}; RLM_SANDBOX_NETWORK_NAMESPACE=require: "
                     "sandboxes will not start")  # fmt: skip
    return Layer(name, False, f"{reason}; sandboxes start without it (Deno's --deny-net only)")


def isolation_layers(settings: WorkerSettings) -> IsolationReport:
    """Which layers sandboxes started with `settings` get on this machine."""
    return IsolationReport(
        (
            Layer(
                "deno_permissions",
                True,
                "reads Pyodide and the runtime's scripts only; net, env, run, ffi, sys denied",
            ),
            Layer(
                "wasm_memory_bound",
                True,
                f"--wasm-max-mem-pages (default {settings.memory_bytes} bytes)",
            ),
            Layer(
                "rlimits",
                True,
                f"RLIMIT_NOFILE={settings.max_open_files}, RLIMIT_CORE=0 (warned per process "
                "when refused)",
            ),
            _network_namespace(settings),
        )
    )


def report_isolation(settings: WorkerSettings) -> IsolationReport:
    """Check the layers and log them in one line: ERROR when sandboxes cannot start without
    a missing layer, WARNING when one is missing, INFO when all are in place."""
    report = isolation_layers(settings)
    fields = {"isolation": report.as_dict()}
    if not report.missing:
        logger.info("sandbox isolation: every layer in place", extra=fields)
        return report
    names = ", ".join(f"{layer.name} ({layer.detail})" for layer in report.missing)
    if settings.network_namespace == "require" and any(
        layer.name == "network_namespace" for layer in report.missing
    ):
        logger.error("sandbox isolation: missing %s", names, extra=fields)
    else:
        logger.warning("sandbox isolation: missing %s", names, extra=fields)
    return report
