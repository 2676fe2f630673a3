"""The "command" environment: any sandbox that can run a command, driven like Pyodide.

One long-lived process per RLM session runs `rlm_repl.py --serve` inside the sandbox the
command line sets up (`docker exec -i`, `podman run -i`, `bwrap`, a cloud CLI): one JSON line
per request on its stdin, one per result on its stdout, the namespace kept in between. The
command line is `RLM_COMMAND_TEMPLATE`, else a preset (`RLM_COMMAND_PRESET`):

    bwrap-python  this machine's CPython with its packages (numpy...) in bubblewrap: no network,
                  read-only /usr and interpreter, a tmpfs /tmp, and the broker through a unix
                  socket in a private directory that the host relays to the broker
    python        a plain child process of the host (trusted code only)

The child's environment is built from scratch: the session's `RLM_*` variables (broker URL,
session token, depth, wait, retry deadline), a fixed PATH and locale, and the host variables
named in `RLM_COMMAND_PASS_ENV`; never the host's API keys or tokens. An execution still
running `RLM_COMMAND_KILL_GRACE_S` past its timeout (a blocking C call: the REPL's own
timeout stops Python loops) gets its process killed; that result reports `state_lost`, and
the next execution starts a new process with the last state and the context.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import JsonValue, ValidationError

import rlm_repl
from host_poller.environments._relay import BrokerRelay
from host_poller.environments.base import Environment, EnvironmentSpec, register_environment
from host_poller.environments.errors import EnvironmentStateError, ExecutionEnvironmentError
from host_poller.settings import HostSettings
from rlm_wire.runtime_models import Context, ExecutionError, ExecutionResult

logger = logging.getLogger(__name__)


#: What every child's PATH is: the host's PATH may name directories the sandbox has not.
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
SOCKET_NAME = "broker.sock"
#: The sandbox's own /tmp (a tmpfs in the bwrap preset), not the host's.
SANDBOX_TMP = "/tmp"  # noqa: S108
PLACEHOLDERS = frozenset(
    {
        "python",
        "python_prefix",
        "python_base_prefix",
        "repl",
        "socket_dir",
        "memory_bytes",
        "env_args",
    }
)
#: Expands to `-e NAME` per session variable (docker/podman copy them from their environment).
ENV_ARGS = "{env_args}"
_STDERR_TAIL_BYTES = 4096
_CLOSE_WAIT_S = 2.0


class CommandTemplateError(ExecutionEnvironmentError, ValueError):
    """The command template (or its preset) cannot make a command line."""


class CommandProcessError(ExecutionEnvironmentError):
    """The command's process did not start, or broke the protocol outside an execution."""


# --- the template ------------------------------------------------------------------------


def bwrap_python_template() -> str:
    """The `bwrap-python` preset: only what the interpreter needs, read-only, no network.

    /lib* follow the host's layout (merged-/usr symlinks, or directories bound read-only).
    """
    parts = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    parts += ["--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            parts += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            parts += ["--ro-bind", str(host), str(host)]
    # /tmp first: the socket directory (and maybe the interpreter) may live under the host's.
    parts += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", SANDBOX_TMP, "--chdir", SANDBOX_TMP]
    for bound in ("{python_base_prefix}", "{python_prefix}", "{repl}", "{socket_dir}"):
        parts += ["--ro-bind", bound, bound]
    # The root (a tmpfs holding the mount points) read-only too: only /tmp is writable.
    parts += ["--remount-ro", "/", "--setenv", "HOME", SANDBOX_TMP]
    # An address-space cap: allocating past it is a MemoryError in the model's code.
    parts += ["/usr/bin/prlimit", "--as={memory_bytes}", "--"]
    parts += ["{python}", "-I", "{repl}", "--serve"]
    return shlex.join(parts)


def python_template() -> str:
    """The `python` preset: a plain child process, isolated mode (trusted code only)."""
    return "{python} -I {repl} --serve"


PRESETS = {"bwrap-python": bwrap_python_template, "python": python_template}
_SETUP_HINTS = {
    "bwrap-python": "install bubblewrap (apt-get install bubblewrap) or set RLM_COMMAND_TEMPLATE"
}


@dataclass(frozen=True)
class CommandLine:
    """A template checked and split: its tokens, and whether it uses the broker socket."""

    tokens: tuple[str, ...]
    uses_socket: bool
    source: str

    def render(self, values: dict[str, str], env_names: list[str]) -> list[str]:
        argv: list[str] = []
        for word in self.tokens:
            if word == ENV_ARGS:
                for name in env_names:
                    argv += ["-e", name]
            else:
                argv.append(word.format_map(values))
        return argv


def parse_template(template: str, source: str) -> CommandLine:
    """Split `template` like a shell and check its placeholders; one-line errors."""
    try:
        tokens = shlex.split(template)
    except ValueError as exc:
        raise CommandTemplateError(f"{source}: {exc}") from exc
    if not tokens:
        raise CommandTemplateError(f"{source} is empty")
    used: set[str] = set()
    for word in tokens:
        try:
            fields = list(string.Formatter().parse(word))
        except ValueError as exc:
            raise CommandTemplateError(f"{source}: {exc} in {word!r}") from exc
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                raise CommandTemplateError(
                    f"{source}: unknown placeholder {{{name}}} in {word!r} (known: {known}; "
                    "write {{ and }} for literal braces)"
                )
            if name == "env_args" and word != ENV_ARGS:
                raise CommandTemplateError(f"{source}: {{env_args}} must be a word of its own")
            used.add(name)
    if "{" in tokens[0] and tokens[0] != "{python}":
        raise CommandTemplateError(f"{source}: the program must be a path or {{python}}")
    return CommandLine(tuple(tokens), "socket_dir" in used, source)


def command_line(settings: HostSettings) -> CommandLine:
    """The command of `settings`: RLM_COMMAND_TEMPLATE, else the RLM_COMMAND_PRESET."""
    if settings.command_template is not None:
        return parse_template(settings.command_template, "RLM_COMMAND_TEMPLATE")
    preset = settings.command_preset
    return parse_template(PRESETS[preset](), f"RLM_COMMAND_PRESET={preset}")


def python_prefixes(python: str) -> tuple[str, str]:
    """(sys.prefix, sys.base_prefix) of the interpreter `python` (a venv and its base)."""
    if python == sys.executable:
        return sys.prefix, sys.base_prefix
    query = "import sys; print(sys.prefix); print(sys.base_prefix)"
    try:
        done = subprocess.run(
            [python, "-I", "-S", "-c", query], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandTemplateError(f"RLM_COMMAND_PYTHON {python!r} does not run: {exc}") from exc
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2:
        raise CommandTemplateError(f"RLM_COMMAND_PYTHON {python!r} does not run: {done.stderr}")
    return lines[0], lines[1]


def template_values(python: str | None) -> dict[str, str]:
    """The placeholders' values that depend on the interpreter alone."""
    python = python or sys.executable
    prefix, base_prefix = python_prefixes(python)
    return {
        "python": python,
        "python_prefix": prefix,
        "python_base_prefix": base_prefix,
        "repl": str(Path(rlm_repl.__file__).resolve()),
    }


def child_environment(
    settings: HostSettings, spec: EnvironmentSpec, broker_url: str
) -> dict[str, str]:
    """The child's whole environment: the session's variables, never the host's secrets."""
    env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    for name in filter(None, (n.strip() for n in settings.command_pass_env.split(","))):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(session_variables(settings, spec, broker_url))
    return env


def session_variables(
    settings: HostSettings, spec: EnvironmentSpec, broker_url: str
) -> dict[str, str]:
    """What `rlm_repl.py` reads inside the sandbox (and `{env_args}` forwards)."""
    return {
        "RLM_BROKER_URL": broker_url,
        "RLM_SESSION_TOKEN": spec.session_token,
        "RLM_DEPTH": str(spec.depth),
        "RLM_MAX_DEPTH": str(spec.max_depth),
        "RLM_BROKER_WAIT_S": str(settings.broker_wait_s),
        "RLM_BROKER_RETRY_DEADLINE_S": str(settings.broker_retry_deadline_s),
        "RLM_STATE_MAX_BYTES": str(settings.state_max_bytes),
    }


def unix_broker_url(socket_path: str, broker_url: str) -> str:
    """`http+unix://` for `socket_path`, keeping the broker URL's path prefix."""
    prefix = urllib.parse.urlsplit(broker_url).path.rstrip("/")
    return f"http+unix://{urllib.parse.quote(socket_path, safe='')}{prefix}"


# --- the process -------------------------------------------------------------------------


class _Lost(Exception):
    """The process is gone or unusable; `kind` and the message go into a state_lost result."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _ReplProcess:
    """One `rlm_repl.py --serve` process: send a request line, read its reply line."""

    def __init__(self, process: asyncio.subprocess.Process, max_line_bytes: int) -> None:
        self.process = process
        self.max_line_bytes = max_line_bytes
        self._stderr: deque[bytes] = deque()
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def _drain_stderr(self) -> None:
        # Output that bypasses the REPL's capture (C code, child processes) lands here; keep
        # the tail for error messages, and keep reading so the process never blocks on it.
        stream = self.process.stderr
        assert stream is not None
        kept = 0
        while chunk := await stream.read(65536):
            self._stderr.append(chunk)
            kept += len(chunk)
            while kept > _STDERR_TAIL_BYTES and len(self._stderr) > 1:
                kept -= len(self._stderr.popleft())

    def stderr_tail(self) -> str:
        text = b"".join(self._stderr)[-_STDERR_TAIL_BYTES:].decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    async def request(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send `body`, return the reply; `_Lost` if the process dies, stalls or misbehaves."""
        line = json.dumps(body).encode() + b"\n"
        if len(line) > self.max_line_bytes:
            raise CommandProcessError(
                f"request of {len(line)} bytes is over RLM_COMMAND_MAX_LINE_BYTES "
                f"({self.max_line_bytes})"
            )
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                stdin.write(line)
                await stdin.drain()
                raw = await stdout.readline()
        except TimeoutError as exc:
            raise _Lost("TimeoutError", f"no answer within {timeout_s:g} s") from exc
        except (ConnectionError, BrokenPipeError) as exc:
            raise _Lost("SandboxCrashedError", await self._exit_message()) from exc
        except ValueError as exc:  # asyncio's line limit
            raise _Lost(
                "SandboxProtocolError", f"the sandbox sent a reply over {self.max_line_bytes} bytes"
            ) from exc
        if not raw.endswith(b"\n"):
            raise _Lost("SandboxCrashedError", await self._exit_message())
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise _Lost(
                "SandboxProtocolError", "the sandbox sent a reply that is not JSON"
            ) from exc
        if not isinstance(reply, dict):
            raise _Lost("SandboxProtocolError", "the sandbox sent a reply that is not an object")
        if "protocol_error" in reply:
            raise CommandProcessError(f"the REPL refused a request: {reply['protocol_error']}")
        return reply

    async def _exit_message(self) -> str:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await self.process.wait()
                await self._stderr_task
        tail = self.stderr_tail()
        status = self.process.returncode
        return f"the sandbox process exited (status {status})" + (f": {tail}" if tail else "")

    def kill(self) -> None:
        if not self.alive:
            return
        # Its own process group (start_new_session): a shell or CLI wrapper goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def aclose(self) -> None:
        stdin = self.process.stdin
        if stdin is not None and self.alive:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                stdin.close()  # EOF: the REPL exits by itself
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


# --- the environment ---------------------------------------------------------------------


class CommandEnvironment(Environment):
    """Runs code in a long-lived `rlm_repl.py --serve` behind a command template."""

    name = "command"

    def __init__(self, settings: HostSettings) -> None:
        self._settings = settings
        self._spec: EnvironmentSpec | None = None
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._process: _ReplProcess | None = None
        self._relay: BrokerRelay | None = None
        self._tmpdir: str | None = None
        self._state: dict[str, JsonValue] = {}
        self._contexts: dict[int, Context] = {}
        """What was loaded, by index: a new process gets them all."""
        self._lock = asyncio.Lock()

    async def start(self, spec: EnvironmentSpec) -> None:
        if self._spec is not None:
            raise EnvironmentStateError("command environment already started")
        line = command_line(self._settings)
        try:
            await self._prepare(line, spec)
            self._spec, self._state = spec, dict(spec.state or {})
            self._process = await self._spawn()
        except BaseException:
            await self.aclose()
            raise

    async def _prepare(self, line: CommandLine, spec: EnvironmentSpec) -> None:
        values = await asyncio.to_thread(template_values, self._settings.command_python)
        broker_url = spec.broker_url
        # mkdtemp makes it 0700: only this user reaches the socket on the host side.
        self._tmpdir = tempfile.mkdtemp(prefix="rlm-cmd-")
        if line.uses_socket:
            socket_path = os.path.join(self._tmpdir, SOCKET_NAME)
            if not spec.broker_url.startswith(("http://", "https://")):
                raise CommandTemplateError(
                    f"{line.source} relays to the broker: RLM_BROKER_URL must be http(s), "
                    f"not {spec.broker_url.split(':', 1)[0]}"
                )
            self._relay = BrokerRelay(
                spec.broker_url,
                socket_path,
                max_connections=self._settings.command_relay_max_connections,
                connect_timeout_s=self._settings.broker_timeout_s,
            )
            try:
                await self._relay.start()
            except OSError as exc:  # e.g. a TMPDIR too long for a unix socket path
                raise CommandProcessError(f"could not listen on {socket_path}: {exc}") from exc
            broker_url = unix_broker_url(socket_path, spec.broker_url)
        values["socket_dir"] = self._tmpdir
        values["memory_bytes"] = str(self._settings.command_memory_bytes)
        variables = session_variables(self._settings, spec, broker_url)
        argv = line.render(values, sorted(variables))
        self._env = child_environment(self._settings, spec, broker_url)
        program = shutil.which(argv[0], path=self._env["PATH"])
        if program is None:
            hint = _SETUP_HINTS.get(self._settings.command_preset, "check RLM_COMMAND_TEMPLATE")
            if self._settings.command_template is not None:
                hint = "check RLM_COMMAND_TEMPLATE"
            raise CommandTemplateError(
                f"{line.source}: program {argv[0]!r} not found or not executable: {hint}"
            )
        self._argv = [program, *argv[1:]]

    async def _spawn(self) -> _ReplProcess:
        """A new process with the last state (and the context, once loaded)."""
        settings = self._settings
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self._tmpdir,
                start_new_session=True,
                limit=settings.command_max_line_bytes,
            )
        except OSError as exc:
            raise CommandProcessError(f"could not start {self._argv[0]}: {exc}") from exc
        repl = _ReplProcess(process, settings.command_max_line_bytes)
        first: list[dict[str, Any]] = [{"state": self._state}]
        first += [{"context": c, "context_index": i} for i, c in self._contexts.items()]
        try:
            for request in first:
                await repl.request(request, settings.command_start_timeout_s)
        except _Lost as exc:
            repl.kill()
            await repl.aclose()
            raise CommandProcessError(f"the command did not start a REPL: {exc}") from exc
        except BaseException:
            repl.kill()
            await repl.aclose()
            raise
        logger.debug("command environment process started", extra={"pid": process.pid})
        return repl

    def _started(self) -> EnvironmentSpec:
        if self._spec is None:
            raise EnvironmentStateError("command environment is not started (or closed)")
        return self._spec

    async def load_context(self, context: Context, index: int = 0) -> None:
        self._started()
        async with self._lock:
            self._contexts[index] = context
            if self._process is not None and self._process.alive:
                try:
                    await self._process.request(
                        {"context": context, "context_index": index},
                        self._settings.command_start_timeout_s,
                    )
                except _Lost as exc:
                    await self._discard_process()
                    raise CommandProcessError(f"could not load the context: {exc}") from exc

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        spec = self._started()
        limit = timeout_s or spec.limits.timeout_s or self._settings.execution_timeout_s
        async with self._lock:
            # A process that died since the last execution lost its variables unseen: this
            # result says so. One that an execution lost has said so in that execution's.
            lost = False
            if self._process is None or not self._process.alive:
                lost = self._process is not None
                await self._discard_process()
                self._process = await self._spawn()
            process = self._process
            started = time.perf_counter()
            try:
                body: dict[str, Any] = {"code": code, "timeout_s": limit}
                if spec.limits.output_bytes is not None:
                    body["output_bytes"] = spec.limits.output_bytes
                grace = self._settings.command_kill_grace_s
                reply = await process.request(body, limit + grace)
                result = self._checked(ExecutionResult.model_validate(reply))
            except (_Lost, ValidationError) as exc:
                await self._discard_process()
                return self._lost_result(exc, limit, time.perf_counter() - started)
        if result.state is not None:
            self._state = dict(result.state)
        return result.model_copy(update={"state_lost": True}) if lost else result

    async def _discard_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            await process.aclose()

    def _checked(self, result: ExecutionResult) -> ExecutionResult:
        """The sandbox is not trusted to keep the state within its bound."""
        size = len(json.dumps(result.state).encode()) if result.state is not None else 0
        if size > self._settings.state_max_bytes:
            raise _Lost("SandboxProtocolError", f"the sandbox sent a state of {size} bytes")
        return result

    def _lost_result(self, exc: Exception, limit: float, seconds: float) -> ExecutionResult:
        if isinstance(exc, _Lost) and exc.kind == "TimeoutError":
            kind = "TimeoutError"
            message = (
                f"execution exceeded {limit:g} s and did not stop; the sandbox process was "
                "killed and its variables are lost"
            )
        elif isinstance(exc, _Lost):
            kind, message = exc.kind, f"{exc}; it was ended and its variables are lost"
        else:
            kind = "SandboxProtocolError"
            message = "the sandbox sent a reply that is not an execution result; it was ended"
        logger.warning("command environment process lost", extra={"kind": kind})
        return ExecutionResult(
            stdout="",
            stderr="",
            error=ExecutionError(type=kind, message=message),
            duration_ms=seconds * 1000,
            memory_bytes=0,
            state=dict(self._state),
            state_lost=True,
        )

    async def get_state(self) -> dict[str, JsonValue]:
        self._started()
        # Every execution returns the state, and only executions change it.
        return dict(self._state)

    async def aclose(self) -> None:
        self._spec = None
        process, self._process = self._process, None
        relay, self._relay = self._relay, None
        tmpdir, self._tmpdir = self._tmpdir, None
        try:
            if process is not None:
                await process.aclose()
        finally:
            if relay is not None:
                await relay.aclose()
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)


register_environment(CommandEnvironment.name, CommandEnvironment)
