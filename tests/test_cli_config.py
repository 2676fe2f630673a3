"""`rlm config`: every setting is documented, and docs/configuration.md is current."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from broker.settings import BrokerSettings
from fake_llm.server import FakeLLMSettings
from host_poller.poller.settings import PollerSettings
from host_poller.service.settings import ServeSettings
from host_poller.viewer.settings import ViewerSettings
from rlm_cli.config_docs import SETTINGS_CLASSES, load, render_markdown
from rlm_cli.main import cli
from rlm_wire.serving import BROKER_PORT, FAKE_LLM_PORT, SANDBOX_PORT, SERVE_PORT, VIEWER_PORT
from sandbox_runtime.service.settings import RuntimeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_is_generated_from_the_settings() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == render_markdown(), (
        "docs/configuration.md is stale: run `rlm config --markdown > docs/configuration.md`"
    )


def test_every_setting_has_a_description() -> None:
    undocumented = [
        f"{path}.{name}"
        for _, path in SETTINGS_CLASSES
        for name, field in load(path).model_fields.items()
        if not field.description
    ]
    assert undocumented == []


#: Variables that several components read on purpose: the same broker, the same tokens.
SHARED = {"RLM_ADMIN_TOKEN", "RLM_BROKER_URL", "RLM_TENANT_TOKEN"}


def test_no_variable_is_shared_by_accident() -> None:
    """Two components reading one variable must mean the same thing by it: listed in SHARED."""
    owners: dict[str, list[str]] = {}
    for _, path in SETTINGS_CLASSES:
        cls = load(path)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name in cls.model_fields:
            owners.setdefault((prefix + name).upper(), []).append(path)
    accidental = {v: o for v, o in owners.items() if len(o) > 1 and v not in SHARED}
    assert accidental == {}


def test_rlm_config_lists_settings() -> None:
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0, result.output
    assert "RLM_LEASE_S" in result.output
    assert "RLM_SANDBOX_" in result.output


def test_rlm_config_lists_the_command_line_and_port_settings() -> None:
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0, result.output
    for variable in (
        "RLM_LOG_LEVEL",
        "RLM_LOG_FORMAT",
        "RLM_STACK_ENV_FILE",
        "RLM_BROKER_PORT",
        "RLM_SANDBOX_PORT",
        "RLM_FAKE_LLM_PORT",
        "RLM_SERVE_PORT",
        "RLM_VIEW_PORT",
    ):
        assert variable in result.output


def test_one_default_port_per_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker on 8000, the sandbox runtime on 8100, `rlm serve` on 8200, `rlm view` on
    8300, the scripted LLM on 9000: in every setting, every URL default, and
    docker-compose.yml."""
    for name in list(os.environ):
        if name.startswith("RLM_"):
            monkeypatch.delenv(name)
    assert (BROKER_PORT, SANDBOX_PORT, SERVE_PORT, VIEWER_PORT, FAKE_LLM_PORT) == (
        8000,
        8100,
        8200,
        8300,
        9000,
    )
    assert ServeSettings().port == SERVE_PORT
    assert ViewerSettings().port == VIEWER_PORT
    assert BrokerSettings().broker_port == BROKER_PORT
    assert PollerSettings().broker_url == f"http://127.0.0.1:{BROKER_PORT}"
    assert RuntimeSettings().port == SANDBOX_PORT
    assert FakeLLMSettings().port == FAKE_LLM_PORT

    compose = (ROOT / "docker-compose.yml").read_text()
    default = {"broker": BROKER_PORT, "sandbox": SANDBOX_PORT, "fake-llm": FAKE_LLM_PORT}
    served = {}
    for service in yaml.safe_load(compose)["services"].values():
        command = [str(arg) for arg in service.get("command") or []]
        if command[:1] == ["rlm"] and command[1] in default and "--port" in command:
            served[command[1]] = int(command[command.index("--port") + 1])
    assert served == default
    for match in re.finditer(r"http://(broker|sandbox|fake-llm)[\w-]*:(\d+)", compose):
        assert int(match.group(2)) == default[match.group(1)], match.group(0)


def test_the_docs_use_the_default_ports() -> None:
    """No doc gives a service a port of the 8000-9099 range other than its default (the
    broker was on 8080 in some); free ports picked at run time are not in that range."""
    pattern = re.compile(r"(?:broker|sandbox|fake-llm|127\.0\.0\.1|localhost):(8\d\d\d|90\d\d)\b")
    expected = {BROKER_PORT, SANDBOX_PORT, FAKE_LLM_PORT}
    wrong = {
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for match in pattern.finditer(path.read_text())
        if int(match.group(1)) not in expected
    }
    assert wrong == set()
