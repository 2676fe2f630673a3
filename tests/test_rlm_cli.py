"""`rlm ask` on an embedded stack with the scripted LLM; what it shows on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlm_cli.main import cli
from rlm_cli.settings import CliSettings
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
    assert "embedded stack: broker http://127.0.0.1:" in result.stderr
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


@pytest.mark.parametrize(
    ("terminal", "level", "fmt", "expected"),
    [
        (True, None, None, ("WARNING", "console")),
        (False, None, None, ("INFO", "json")),
        (True, None, "json", ("INFO", "json")),
        (False, None, "console", ("WARNING", "console")),
        (True, "debug", None, ("DEBUG", "console")),
    ],
)
def test_logs_are_quiet_and_readable_on_a_terminal_and_json_elsewhere(
    terminal: bool, level: str | None, fmt: str | None, expected: tuple[str, str]
) -> None:
    settings = CliSettings(log_level=level, log_format=fmt)
    assert settings.log_output(terminal=terminal) == expected


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _in_a_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal; its exit code and all
    it wrote, escape sequences removed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    child = subprocess.Popen(
        argv, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd,
        start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    output = bytearray()
    deadline = time.monotonic() + 100
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if child.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            output += chunk
        code = child.wait(timeout=30)
    finally:
        os.close(leader)
        if child.poll() is None:
            child.kill()
            child.wait()
    return code, _ANSI.sub("", output.decode("utf-8", "replace"))


@pytest.mark.parametrize("log_format", [None, "json"])
def test_rlm_ask_on_a_terminal_prints_no_json_log_line(
    tmp_path: Path, redis_url: str, log_format: str | None
) -> None:
    (tmp_path / "ctx.txt").write_text(make_text("whale", 6))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env |= {"RLM_REDIS_URL": redis_url, "TERM": "xterm-256color"}
    if log_format is not None:
        env["RLM_LOG_FORMAT"] = log_format
    rlm = str(Path(sys.executable).with_name("rlm"))
    code, shown = _in_a_terminal(
        [rlm, "ask", "--context", "ctx.txt", "--environment", "local",
         "How often is the word 'whale' used?"],
        env,
        tmp_path,
    )  # fmt: skip
    assert code == 0, shown[-3000:]
    lines = [line.strip() for line in shown.splitlines() if line.strip()]
    json_lines = [line for line in lines if line.startswith('{"')]
    assert "6" in lines
    if log_format is None:
        assert json_lines == [], json_lines[:3]
        assert "iteration" in shown  # the live status line was drawn
    else:
        assert json_lines  # asked for: JSON even on a terminal, so the check above can fail
