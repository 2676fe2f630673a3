"""`rlm config`: every setting is documented, and docs/configuration.md is current."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from rlm_cli.config_docs import SETTINGS_CLASSES, load, render_markdown
from rlm_cli.main import cli

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
