"""The README's `rlm` examples run as written, from the project's root, and give the answer
the README states.

The shell blocks are taken from README.md itself. `rlm up` runs in the background while the
examples after it run (the README says "with the stack up"); `rlm ask` must find that stack
by itself. What the test changes around the commands, never in them: the ports are free
ones (RLM_*_PORT=0) and the env file and trajectories go to a temporary directory, so that a
stack a developer keeps up is left alone. `scripts/setup.sh` is not run again: the
environment running this test is what it installed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: A command of a shell line that runs `rlm` (`rlm ...`, `.venv/bin/rlm ...`).
_RLM = re.compile(r"(?:^|/)rlm(?:\s|$)")


def shell_lines(markdown: str) -> list[str]:
    """The lines of the ```sh blocks, in order."""
    blocks = re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def rlm_commands(markdown: str) -> list[str]:
    """Each `&&`-joined command of the shell lines that runs `rlm`, as written."""
    return [
        part.strip()
        for line in shell_lines(markdown)
        for part in line.split("&&")
        if _RLM.search(shlex.split(part.strip())[0])
    ]


def stated_answer(markdown: str) -> str:
    found = re.search(r"The answer is \*\*(\d+)\*\*", markdown)
    assert found, "README.md must state the answer of its `rlm ask` example"
    return found.group(1)


def test_the_readme_has_the_examples_this_test_runs() -> None:
    commands = rlm_commands(README)
    assert ".venv/bin/rlm up" in commands
    assert any(" ask " in f" {command} " for command in commands)


def test_the_sample_context_holds_the_stated_answer() -> None:
    (ask,) = [c for c in rlm_commands(README) if " ask " in f" {c} "]
    argv = shlex.split(ask)
    context = ROOT / argv[argv.index("--context") + 1]
    assert context.stat().st_size < 300_000
    text = context.read_text(encoding="utf-8")
    # The scripted LLM's count_words scenario counts the pattern \bWORD\b in each chunk.
    word = re.search(r"the word '([\w-]+)'", argv[-1])
    assert word is not None
    assert str(len(re.findall(rf"\b{word.group(1)}\b", text))) == stated_answer(README)


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env |= {
        "RLM_BROKER_PORT": "0",
        "RLM_SANDBOX_PORT": "0",
        "RLM_FAKE_LLM_PORT": "0",
        "RLM_STACK_ENV_FILE": str(tmp_path / "local-stack.env"),
        "RLM_TRAJECTORY_DIR": str(tmp_path / "trajectories"),
    }
    return env


@pytest.fixture
def stack_up(environ: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """The README's `rlm up` in the background, as written; its env file once it is up."""
    (up,) = [c for c in rlm_commands(README) if c.endswith("rlm up")]
    env_file = Path(environ["RLM_STACK_ENV_FILE"])
    with (tmp_path / "up.log").open("wb") as log:
        child = subprocess.Popen(
            ["bash", "-c", f"exec {up}"], cwd=ROOT, env=environ, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 180
            while not env_file.exists():
                assert child.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "rlm up did not come up"
                time.sleep(0.1)
            yield env_file
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=60) == 0, (tmp_path / "up.log").read_text()[-3000:]
            assert not env_file.exists()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)


@pytest.mark.timeout(420)
def test_the_readme_rlm_examples_run_as_written(stack_up: Path, environ: dict[str, str]) -> None:
    answer = stated_answer(README)
    others = [c for c in rlm_commands(README) if not c.endswith("rlm up")]
    assert others
    for command in others:
        done = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=environ, capture_output=True, text=True,
            timeout=240, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        if " ask " in f" {command} ":
            assert done.stdout.strip() == answer, done.stderr[-3000:]
            broker_url = re.search(r"^RLM_BROKER_URL=(\S+)$", stack_up.read_text(), re.MULTILINE)
            assert broker_url is not None
            assert f"using the stack of `rlm up` at {broker_url.group(1)}" in done.stderr
