"""What stops a command before it starts is one line on stderr, a non-zero exit, no traceback:
a port in use, Deno or Pyodide missing or broken, a context file that is not UTF-8, an LLM
profile's API key variable unset, a planted env file."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.redis_server import RedisServer
from rlm_cli.main import cli

# Loaded now: the checks below run as the commands run them, with nothing left to import.
_LOADED = [
    importlib.import_module(name)
    for name in (
        "rlm_cli.ask",
        "rlm_cli.embedded",
        "rlm_cli.poller_commands",
        "rlm_cli.sandbox_commands",
        "sandbox_runtime.service.serve",
    )
]

PROFILE = (
    '[{"name": "gpt", "base_url": "https://api.openai.com/v1", '
    '"api_key_env": "RLM_TEST_UNSET_KEY", "model": "gpt-5-mini"}]'
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RLM_* variable from the outside, and a working directory without an env file."""
    for name in list(os.environ):
        if name.startswith("RLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RLM_TRAJECTORY_DIR", str(tmp_path / "trajectories"))
    monkeypatch.setenv("RLM_SANDBOX_TOKEN", "cli-errors-token")  # `rlm sandbox` needs one
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_text()
    except OSError:  # ended meanwhile
        return ""


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_line_error(result: Result) -> str:
    """The single stderr line of a failed command (and no traceback anywhere)."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


# --- a port in use --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "service", "how"),
    [
        (("broker", "--port", "{port}"), "broker", "--port or RLM_BROKER_PORT"),
        (("sandbox", "--port", "{port}"), "sandbox", "--port or RLM_SANDBOX_PORT"),
        (("fake-llm", "--port", "{port}"), "fake-llm", "--port or RLM_FAKE_LLM_PORT"),
        (("up", "--port", "{port}"), "broker", "--port or RLM_BROKER_PORT"),
        (
            ("up", "--port", "0", "--sandbox-port", "{port}"),
            "sandbox",
            "--sandbox-port or RLM_SANDBOX_PORT",
        ),
        (
            ("up", "--port", "0", "--sandbox-port", "0", "--llm-port", "{port}"),
            "fake-llm",
            "--llm-port or RLM_FAKE_LLM_PORT",
        ),
    ],
)
def test_a_port_in_use_is_one_line_naming_the_port_and_how_to_change_it(
    busy_port: int, args: tuple[str, ...], service: str, how: str
) -> None:
    result = run(*(arg.format(port=busy_port) for arg in args))
    line = one_line_error(result)
    assert f"port {busy_port} on 127.0.0.1 is already in use ({service})" in line
    assert how in line


@pytest.mark.parametrize(
    ("command", "variable"),
    [("broker", "RLM_BROKER_PORT"), ("sandbox", "RLM_SANDBOX_PORT"), ("up", "RLM_BROKER_PORT")],
)
def test_the_port_variables_choose_the_port(
    busy_port: int, monkeypatch: pytest.MonkeyPatch, command: str, variable: str
) -> None:
    monkeypatch.setenv(variable, str(busy_port))
    line = one_line_error(run(command))
    assert f"port {busy_port} " in line and variable in line


def test_the_real_rlm_broker_process_says_one_line(busy_port: int, tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("rlm")), "broker", "--port", str(busy_port)],
        env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"Error: port {busy_port} on 127.0.0.1 is already in use (broker): choose another with "
        "--port or RLM_BROKER_PORT (0 picks a free one)"
    ]


# --- Deno and Pyodide -----------------------------------------------------------------------


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


SANDBOX_COMMANDS = [
    ("sandbox", "--port", "0"),
    ("up", "--port", "0", "--sandbox-port", "0", "--llm-port", "0"),
    ("ask", "--environment", "pyodide", "How many times does the word 'whale' appear?"),
]


@pytest.mark.parametrize("args", SANDBOX_COMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize(
    ("setting", "make", "says"),
    [
        ("RLM_SANDBOX_DENO_PATH", lambda d: str(d / "nowhere" / "deno"), "is missing"),
        ("RLM_SANDBOX_DENO_PATH", lambda d: _script(d / "deno", "exit 3"), "exited with 3"),
        ("RLM_SANDBOX_DENO_PATH", lambda d: _script(d / "deno", "echo hello"), "is not Deno"),
        ("RLM_SANDBOX_DENO_PATH", lambda d: str(d), "cannot run"),
        ("RLM_SANDBOX_PYODIDE_DIR", lambda d: str(d), "Pyodide is missing"),
    ],
    ids=["deno-missing", "deno-fails", "not-deno", "deno-not-executable", "pyodide-missing"],
)
def test_deno_or_pyodide_missing_is_found_at_once(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    setting: str,
    make: Callable[[Path], str],
    says: str,
) -> None:
    monkeypatch.setenv(setting, make(tmp_path))

    def started_first(server: RedisServer) -> RedisServer:
        raise AssertionError("the stack was started before Deno and Pyodide were checked")

    monkeypatch.setattr(RedisServer, "start", started_first)  # "at once": before anything
    line = one_line_error(run(*args))
    assert says in line and setting in line
    assert "scripts/setup.sh" in line


def test_a_hanging_deno_is_given_up_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hang = f"exec sleep 86400.{os.getpid()}"  # a command line no other process has
    monkeypatch.setenv("RLM_SANDBOX_DENO_PATH", _script(tmp_path / "deno", hang))
    line = one_line_error(run("sandbox", "--port", "0"))
    assert "did not answer `deno --version`" in line and "scripts/setup.sh" in line
    # Given up on: the hanging process is gone, not left to run out its day.
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p) == f"sleep\0{hang[11:]}\0"]
    assert not left


def test_no_deno_package_binary_names_the_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import deno

    def no_binary() -> str:
        raise FileNotFoundError("deno")

    monkeypatch.setattr(deno, "find_deno_bin", no_binary)
    line = one_line_error(run("sandbox", "--port", "0"))
    assert "Deno is not installed" in line and "scripts/setup.sh" in line


# --- the context file and the LLM profiles ----------------------------------------------------


def test_a_context_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes(
        "Moby Dick, the white whale of Ahab's caf\xe9\n".encode("latin-1")
    )
    line = one_line_error(run("ask", "--context", "latin1.txt", "How many whales?"))
    assert "latin1.txt is not UTF-8" in line and "0xe9" in line


def test_a_json_context_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ctx.json").write_text('{"chapters": [')
    line = one_line_error(run("ask", "--context", "ctx.json", "How many whales?"))
    assert "ctx.json is not valid JSON" in line


@pytest.mark.parametrize(
    "args",
    [("ask", "How many whales?"), ("up", "--port", "0"), ("poller",)],
    ids=["ask", "up", "poller"],
)
def test_an_unset_api_key_variable_is_one_line(
    monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    monkeypatch.setenv("RLM_LLM_PROFILES", PROFILE)
    monkeypatch.setenv("RLM_ADMIN_TOKEN", "admin")  # the poller's token
    monkeypatch.delenv("RLM_TEST_UNSET_KEY", raising=False)
    line = one_line_error(run(*args))
    assert "LLM profile 'gpt'" in line
    assert "RLM_TEST_UNSET_KEY is not set" in line


def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_MAX_DEPTH", "deep")
    line = one_line_error(run("ask", "How many whales?"))
    assert "RLM_MAX_DEPTH" in line


# --- the env file of `rlm up` -----------------------------------------------------------------


def test_rlm_up_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    link = tmp_path / "stack.env"
    link.symlink_to(target)
    line = one_line_error(
        run("up", "--port", "0", "--sandbox-port", "0", "--llm-port", "0", "--env-file", str(link))
    )
    assert f"refusing to use {link}: it is a symbolic link" in line
    assert target.read_text() == "precious"


def test_rlm_ask_refuses_a_planted_symlink(tmp_path: Path) -> None:
    (tmp_path / ".rlm").mkdir()
    (tmp_path / ".rlm" / "local-stack.env").symlink_to(tmp_path / "elsewhere.env")
    line = one_line_error(run("ask", "--environment", "local", "How many whales?"))
    assert "it is a symbolic link" in line
