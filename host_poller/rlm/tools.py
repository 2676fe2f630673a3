"""Host-side tools: Python callables of the RLM's process that sandboxed code calls by name.

    rlm = RLM(tools=[search, fetch_page])      # or {"search": search, ...}
    # model code:  hits = search("whale", k=3)

Each tool is a plain function in the REPL (a wrapper defined by `prelude`, run once when
the session's environment has started, and again if it loses its variables) that calls
`call_tool(name, *args, **kwargs)` (`rlm_repl`). The call goes through the broker like an
`llm_query`, with `params: {"kind": "tool", "tool": name}` and the arguments as JSON text;
the poller of the RLM's own process (the embedded stack, `rlm serve`) finds the run's
`Toolbox` on its tracker and answers with `Toolbox.call`. So a tool runs where the RLM runs,
never in the sandbox, and only for the run that gave it.

Arguments and results are JSON values. A sync tool runs in a thread, an async one in the
poller's event loop, each bounded by RLM_TOOL_TIMEOUT_S; its result must fit
RLM_TOOL_MAX_RESULT_BYTES as JSON. Whatever goes wrong becomes a `RequestFailed` with code
`tool_failed` (`tool_unknown` for a name the run has not), which the sandbox raises as
`LLMQueryError`: the exception's type and message, never the host's traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import keyword
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from host_poller.environments.base import Environment
from host_poller.environments.errors import ExecutionEnvironmentError
from host_poller.poller.errors import RequestFailed
from host_poller.rlm.errors import RLMConfigError
from rlm_repl import API_NAMES, TOOL_DOC_MARK
from rlm_wire.codes import ErrorCode

logger = logging.getLogger(__name__)

ToolFunction = Callable[..., Any]
"""A tool: a sync or async callable taking and returning JSON values."""

ToolsArgument = Iterable[ToolFunction] | Mapping[str, ToolFunction]
"""What `RLM(tools=...)` accepts: callables (named by `__name__`) or a dict name -> callable."""

#: Names the REPL binds itself (besides `API_NAMES`): a tool must not shadow them.
RESERVED_NAMES = frozenset({"context", "state", "answer", "print"})
#: Bounds on what of a tool the model is shown (the prompt and the wrapper's docstring).
_MAX_DOC_CHARS = 2000
_MAX_SIGNATURE_CHARS = 300
_MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Tool:
    """One host-side tool: its name in the REPL, the callable, and what the model is told."""

    name: str
    function: ToolFunction
    doc: str
    """The callable's docstring, cleaned and bounded ("" without one)."""
    signature: str
    """Its parameters as text, e.g. `(query: str, k: int = 3) -> list[str]`."""

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return self.doc.split("\n", 1)[0].strip()


def check_name(name: str) -> None:
    """A tool name must be a plain identifier the REPL does not use; else RLMConfigError."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise RLMConfigError(f"tool name {name!r} is not a Python identifier")
    if name.startswith("_"):
        raise RLMConfigError(f"tool name {name!r} must not start with an underscore")
    if name in API_NAMES or name in RESERVED_NAMES or name.startswith("context"):
        raise RLMConfigError(f"tool name {name!r} is a name of the REPL itself; rename the tool")


def make_tool(name: str, function: ToolFunction) -> Tool:
    check_name(name)
    if not callable(function):
        raise RLMConfigError(f"tool {name!r} is not callable")
    doc = (inspect.getdoc(function) or "").strip()
    signature = signature_text(function)
    return Tool(name, function, doc[:_MAX_DOC_CHARS], signature[:_MAX_SIGNATURE_CHARS])


class _Written(str):
    """An annotation kept as text (`from __future__ import annotations`), shown unquoted."""

    def __repr__(self) -> str:
        return str(self)


def signature_text(function: ToolFunction) -> str:
    """`(query: str, k: int = 3) -> list[str]`, annotations as written; `(*args, **kwargs)`
    for a callable without a signature (some builtins)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "(*args, **kwargs)"

    def written(annotation: Any) -> Any:
        return _Written(annotation) if isinstance(annotation, str) else annotation

    parameters = [
        p.replace(annotation=written(p.annotation)) for p in signature.parameters.values()
    ]
    shown = signature.replace(
        parameters=parameters, return_annotation=written(signature.return_annotation)
    )
    return str(shown)


def tools_from(tools: ToolsArgument | None, *, timeout_s: float, max_result_bytes: int) -> Toolbox:
    """The `Toolbox` of `RLM(tools=...)`: callables named by `__name__`, or a dict of them."""
    if tools is None:
        return Toolbox((), timeout_s=timeout_s, max_result_bytes=max_result_bytes)
    if isinstance(tools, Mapping):
        pairs = list(tools.items())
    elif callable(tools) or isinstance(tools, str):
        raise RLMConfigError("tools are a list of callables or a dict name -> callable")
    else:
        pairs = []
        for function in tools:
            name = getattr(function, "__name__", None)
            if not isinstance(name, str) or name == "<lambda>":
                raise RLMConfigError(
                    f"tool {function!r} has no usable __name__; pass tools as a dict name -> "
                    "callable"
                )
            pairs.append((name, function))
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RLMConfigError(f"tool names given twice: {', '.join(duplicates)}")
    built = tuple(make_tool(name, function) for name, function in pairs)
    return Toolbox(built, timeout_s=timeout_s, max_result_bytes=max_result_bytes)


class Toolbox:
    """The tools of one run, with their bounds; the poller's `HostTools` for that run."""

    def __init__(self, tools: Iterable[Tool], *, timeout_s: float, max_result_bytes: int) -> None:
        if timeout_s <= 0 or max_result_bytes <= 0:
            raise ValueError("timeout_s and max_result_bytes must be > 0")
        self.tools = {tool.name: tool for tool in tools}
        self.timeout_s = timeout_s
        self.max_result_bytes = max_result_bytes

    def __bool__(self) -> bool:
        return bool(self.tools)

    def __len__(self) -> int:
        return len(self.tools)

    async def call(self, name: str, arguments: str) -> str:
        """Run tool `name` on its JSON arguments; its result as JSON text (RequestFailed)."""
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            raise RequestFailed(
                f"this run has no tool named {name[:100]!r} (its tools: {known})",
                code=ErrorCode.TOOL_UNKNOWN,
            )
        return await invoke(tool, arguments, self.timeout_s, self.max_result_bytes)

    def prelude(self) -> str:
        """The cell that defines one REPL function per tool (top-level `def`s, so they
        survive a sandbox's hibernation like any function the model defines)."""
        return "\n\n".join(_wrapper_source(tool) for tool in self.tools.values())

    def listing(self) -> str:
        """The system prompt's section on the tools (empty without tools)."""
        if not self.tools:
            return ""
        lines = [
            f"- `{tool.name}{tool.signature}`: {tool.summary or '(no description)'}"
            for tool in self.tools.values()
        ]
        return (
            "Tools: these functions are in the REPL too. Each runs on the host, not in the "
            "REPL; call it like any function. Arguments and the result are JSON values "
            "(str, int, float, bool, None, list, dict); a failure raises LLMQueryError "
            '(code "tool_failed", or "tool_unknown"); `print(name.__doc__)` shows a tool\'s '
            "whole description.\n" + "\n".join(lines)
        )


def _wrapper_source(tool: Tool) -> str:
    # Only a checked identifier and repr() literals go into the source: nothing of the
    # tool's text can become code.
    doc = f"{tool.name}{tool.signature}\n\n{tool.doc}\n\n{TOOL_DOC_MARK}"
    return (
        f"def {tool.name}(*args, **kwargs):\n"
        f"    {doc!r}\n"
        f"    return call_tool({tool.name!r}, *args, **kwargs)\n"
    )


async def install(env: Environment, toolbox: Toolbox, timeout_s: float) -> None:
    """Define the tool functions in `env` (after its context is loaded, and again after it
    lost its variables); an `ExecutionEnvironmentError` if that fails."""
    if not toolbox:
        return
    result = await env.execute(toolbox.prelude(), timeout_s=timeout_s)
    if result.error is not None:
        raise ExecutionEnvironmentError(
            f"the tools could not be defined in the REPL: {result.error.type}: "
            f"{result.error.message}"
        )


def parse_arguments(arguments: str) -> tuple[list[Any], dict[str, Any]]:
    """`{"args": [...], "kwargs": {...}}` as `call_tool` sends them; RequestFailed if not."""
    try:
        data = json.loads(arguments)
    except (ValueError, RecursionError):
        data = None
    args = data.get("args") if isinstance(data, dict) else None
    kwargs = data.get("kwargs") if isinstance(data, dict) else None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise RequestFailed(
            'a tool call\'s prompt must be JSON {"args": [...], "kwargs": {...}}',
            code=ErrorCode.INVALID_REQUEST,
        )
    return args, kwargs


async def invoke(tool: Tool, arguments: str, timeout_s: float, max_result_bytes: int) -> str:
    """Call `tool` on the JSON `arguments`; its result as JSON text, within the bounds.

    A sync callable runs on a thread of its own: on timeout the caller gets its error at
    once, but the thread runs on to its end (Python cannot stop it)."""
    args, kwargs = parse_arguments(arguments)
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            value = await _call(tool.function, args, kwargs)
    except TimeoutError as exc:
        if deadline.expired():
            raise _failed(tool, f"timed out after {timeout_s:g} s (RLM_TOOL_TIMEOUT_S)") from exc
        raise _failed(tool, "raised " + _describe(exc)) from exc
    except Exception as exc:
        logger.info("tool raised", extra={"tool": tool.name, "error": _describe(exc)})
        raise _failed(tool, "raised " + _describe(exc)) from exc
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _failed(tool, f"returned a {type(value).__name__}, not a JSON value") from exc
    size = len(text.encode())
    if size > max_result_bytes:
        raise _failed(
            tool,
            f"returned {size:,} bytes of JSON, over the bound of {max_result_bytes:,} "
            "(RLM_TOOL_MAX_RESULT_BYTES)",
        )
    return text


async def _call(function: ToolFunction, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if _is_async(function):
        return await function(*args, **kwargs)
    value = await _in_thread(function, args, kwargs)
    if inspect.isawaitable(value):  # a sync callable that hands back a coroutine
        value = await value
    return value


async def _in_thread(function: ToolFunction, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """`function` on a daemon thread of its own, like `asyncio.to_thread` (context copied)
    but outside the loop's default executor: a tool stuck past its timeout holds neither
    that executor's threads (DNS lookups use them) nor the end of `asyncio.run`, which
    waits for every thread of that executor."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # the caller timed out, or was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        value, error = None, None
        try:
            value = context.run(function, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            error = exc
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a tool ends no poller
            error = RuntimeError(f"{type(exc).__name__} {exc}".strip())
        with contextlib.suppress(RuntimeError):  # the loop closed while the tool ran
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="rlm-tool", daemon=True).start()
    return await future


def _is_async(function: ToolFunction) -> bool:
    call = getattr(function, "__call__", None)  # noqa: B004 - a callable object's method
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _failed(tool: Tool, why: str) -> RequestFailed:
    return RequestFailed(f"tool {tool.name!r} {why}", code=ErrorCode.TOOL_FAILED)
