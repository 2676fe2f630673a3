"""`rlm ask` on an embedded stack with the scripted LLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlm_cli.main import cli
from tests.test_rlm import make_text


def test_rlm_ask_answers_on_an_embedded_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.delenv("RLM_BROKER_URL", raising=False)
    monkeypatch.setenv("RLM_REDIS_URL", redis_url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ctx.txt").write_text(make_text("whale", 9))
    result = CliRunner().invoke(
        cli,
        ["--log-level", "WARNING", "ask", "--context", "ctx.txt", "--environment", "local",
         "--json", "How often is the word 'whale' used?"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["answer"] == "9"
    assert payload["stop_reason"] == "final"
    assert "scripted LLM" in result.stderr
    assert Path(payload["trajectory_path"]).exists()


def test_rlm_ask_prints_the_answer_alone_and_reports_the_run_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.delenv("RLM_BROKER_URL", raising=False)
    monkeypatch.setenv("RLM_REDIS_URL", redis_url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ctx.txt").write_text(make_text("whale", 4))
    result = CliRunner().invoke(
        cli,
        ["--log-level", "WARNING", "ask", "--context", "ctx.txt", "--environment", "local",
         "How often is the word 'whale' used?"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "4"
    summary = " ".join(result.stderr.split())
    assert "2 iterations" in summary
    assert "LLM calls" in summary
    assert "tokens" in summary
