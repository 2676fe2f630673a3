"""The host side's settings for RLM runs: one frozen object, built once at start from `RLM_*`.

LLM profiles live in `host_poller.llm.LLMSettings` and the poller's knobs in
`host_poller.poller.settings.PollerSettings`; both read the same environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_repl import RetryPolicy


def _default_trajectory_dir() -> Path:
    """`$XDG_DATA_HOME/rlm-broker/trajectories`, else `~/.local/share/rlm-broker/trajectories`.

    Absolute, so a process started in a directory it cannot write (an image's /app) still
    writes its trajectories; `XDG_DATA_HOME` counts only when absolute, as the spec says.
    """
    data_home = Path(os.environ.get("XDG_DATA_HOME", ""))
    if not data_home.is_absolute():
        data_home = Path.home() / ".local" / "share"
    return data_home / "rlm-broker" / "trajectories"


class HostSettings(BaseSettings):
    """How an RLM run reaches the broker and runs code; each field's variable is `RLM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_", frozen=True, extra="ignore")

    broker_url: str | None = Field(
        None,
        description="Base URL of the broker (RLM_BROKER_URL). Unset: `rlm ask` uses the stack "
        "of a running `rlm up` (its RLM_STACK_ENV_FILE), else starts an embedded stack (Redis, "
        "broker, poller) in-process.",
    )
    tenant_token: SecretStr | None = Field(
        None, description="Tenant token the RLM creates its broker sessions with."
    )
    environment: str = Field(
        "pyodide",
        description="Where model code runs: pyodide, remote, command (docs/rlm.md), or local "
        "(trusted only).",
    )
    runtime_url: str | None = Field(
        None, description="Base URL of the `rlm sandbox` runtime (pyodide/remote environments)."
    )
    runtime_token: SecretStr | None = Field(
        None, description="Bearer token of the sandbox runtime."
    )
    trajectory_dir: Path = Field(
        default_factory=_default_trajectory_dir,
        description="Directory of the JSONL trajectory of each run (default: under "
        "$XDG_DATA_HOME, else ~/.local/share).",
    )
    trajectory_max_bytes: int = Field(
        1 * 2**30,
        ge=2**20,
        description="Total size of the trajectory files kept in RLM_TRAJECTORY_DIR (tenant "
        "subdirectories included): past it the least recently written are removed, checked "
        "as runs start, at most once a minute per directory (never a file this process is "
        "still writing).",
    )
    max_depth: int = Field(
        1, ge=0, le=16, description="Recursion depth: 1 = sub-calls are plain LLM calls."
    )
    max_iterations: int = Field(20, ge=1, le=1000, description="Root turns before a forced answer.")
    max_consecutive_errors: int = Field(
        5,
        ge=1,
        le=1000,
        description="A run fails (a clear error, no answer) after this many root turns in a row "
        "whose code raised the same error (type and message).",
    )
    sub_rlm_max_depth: int = Field(
        4,
        ge=1,
        le=64,
        description="Operator cap on the depth of sub-RLMs this host runs for any tenant: a "
        "session's max_depth (tenant-set metadata) is lowered to it.",
    )
    sub_rlm_max_iterations: int = Field(
        50,
        ge=1,
        le=1000,
        description="Operator cap on the root turns of each sub-RLM this host runs, whatever "
        "the session's metadata asks.",
    )
    output_max_chars: int = Field(
        20_000, ge=100, description="Execution output fed back to the model is cut to this."
    )
    execution_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Wall clock of one code execution."
    )
    state_max_bytes: int = Field(
        1_000_000, ge=1024, description="Bound on the shared `state` dict as JSON."
    )
    tool_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Bound on one call of a host-side tool (`RLM(tools=...)`); past it the "
        "sandboxed caller gets LLMQueryError tool_failed (a sync tool's thread runs on).",
    )
    tool_max_result_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=16 << 20,
        description="Bound on a host-side tool's result as JSON (UTF-8); a larger one is a "
        "tool_failed error, not a truncated value.",
    )
    broker_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of each broker HTTP call (long-polls add their wait)."
    )
    broker_wait_s: float = Field(
        20.0, gt=0, le=120, description="Long-poll wait of /enqueue and /requests in the REPL."
    )
    broker_retry_deadline_s: float = Field(
        60.0,
        ge=0,
        description=(
            "How long a call to the broker or the sandbox runtime (and an llm_query of the "
            "local environment) rides out an outage or 429/503 answers; 0: no retries."
        ),
    )
    run_session_ttl_s: int = Field(
        6 * 3600, gt=0, description="Lifetime of the broker session token of one RLM run."
    )
    command_template: str | None = Field(
        None,
        description="The `command` environment's command line (split like a shell; "
        "placeholders {python}, {python_prefix}, {python_base_prefix}, {repl}, {socket_dir}, "
        "{memory_bytes}, {env_args}; docs/rlm.md). Unset: the RLM_COMMAND_PRESET.",
    )
    command_preset: Literal["bwrap-python", "python"] = Field(
        "bwrap-python",
        description="The `command` environment's template when RLM_COMMAND_TEMPLATE is unset: "
        "bwrap-python (this machine's CPython and its packages in bubblewrap, no network, the "
        "broker through a unix socket) or python (a plain child process; trusted code only).",
    )
    command_python: str | None = Field(
        None, description="The {python} of command templates. Unset: this host's interpreter."
    )
    command_pass_env: str = Field(
        "",
        description="Comma-separated host variables the command itself gets (e.g. DOCKER_HOST); "
        "nothing else of the host's environment reaches it.",
    )
    command_start_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Bound on starting the command and loading the context."
    )
    command_kill_grace_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="How long past its timeout an execution may run (a blocking C call) before "
        "the command's process is killed and its variables are lost.",
    )
    command_max_line_bytes: int = Field(
        64 << 20,
        ge=1 << 16,
        description="Bound on one protocol line to or from the command (the context included).",
    )
    command_memory_bytes: int = Field(
        4 << 30,
        ge=64 << 20,
        description="The {memory_bytes} of command templates: the bwrap-python preset caps the "
        "sandbox's address space at it (past it, allocations raise MemoryError).",
    )
    command_relay_max_connections: int = Field(
        16,
        ge=1,
        le=1024,
        description="Connections at once from one sandbox's unix socket to the broker.",
    )

    def retry_policy(self) -> RetryPolicy:
        """The one retry policy of broker clients, with this host's deadline (0: no retries)."""
        return RetryPolicy(deadline_s=self.broker_retry_deadline_s)
