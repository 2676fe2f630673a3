"""Wire models of the sandbox runtime's HTTP API (`rlm sandbox`), shared by server and clients.

The RLM loop's `pyodide` and `remote` environments import these; the runtime validates every
request body with them (unknown fields are refused).
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

#: What may be bound as `context`: a JSON string, array or object.
Context = str | list[Any] | dict[str, Any]
#: Indexes a context may be bound at (`context_0` ... ): `rlm_repl.MAX_CONTEXTS`.
MAX_CONTEXT_INDEXES = 256
#: A context's name in the runtime's cache: the lowercase hex sha256 of its JSON bytes.
CONTEXT_HASH_PATTERN = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Model):
    """Per-session limits; any field left out takes the runtime's configured default."""

    timeout_s: float | None = Field(None, gt=0, le=3600, description="Wall clock per execution.")
    memory_bytes: int | None = Field(
        None, ge=64 * 2**20, le=4 * 2**30, description="Bound on the sandbox's WebAssembly memory."
    )
    output_bytes: int | None = Field(
        None,
        ge=1024,
        le=64 * 2**20,
        description="Cap on stdout, on stderr and on the FINAL value, each, per execution.",
    )
    idle_ttl_s: float | None = Field(
        None, gt=0, le=7 * 86400, description="An idle session is ended after this long."
    )


class BrokerAccess(_Model):
    """How the runtime (never the sandbox) reaches the broker for this session's llm_query."""

    url: str = Field(description="Base URL of the broker, e.g. http://127.0.0.1:8000")
    token: str = Field(description="The broker session token; kept outside the sandbox process.")
    depth: int = Field(0, ge=0, description="Depth of this session's RLM; sub-calls go at depth+1.")
    max_depth: int = Field(1, ge=0, description="rlm_query is allowed while depth + 1 < max_depth.")


class CreateSession(_Model):
    broker: BrokerAccess | None = None
    limits: Limits = Limits()
    setup_code: str | None = Field(None, description="Python run once when the session starts.")
    state: dict[str, JsonValue] | None = Field(
        None, description="Initial value of the shared `state` dict."
    )


class SessionCreated(_Model):
    session_id: str


class ExecuteRequest(_Model):
    code: str
    timeout_s: float | None = Field(None, gt=0, le=3600)


class ExecutionError(_Model):
    """The Python error of an execution; the sizes bound what a sandbox may send back."""

    type: str = Field(max_length=256)
    message: str = Field(max_length=16_384)
    traceback: str | None = Field(None, max_length=65_536)


class SubCallUsage(_Model):
    """One answered llm_query / rlm_query of an execution: its broker request id and usage.

    The host counts each request id once, so a run's usage is right whichever process's
    poller answered the call.
    """

    id: str
    usage: dict[str, float]


class ExecutionResult(_Model):
    """What one execution returned: output, the Python error if any, and FINAL if it was called."""

    stdout: str
    stderr: str
    error: ExecutionError | None = None
    final: dict[str, Any] | None = Field(
        None,
        description='Set when the code finished the run: {"value": str, "source": "FINAL" | '
        '"FINAL_VAR" | "answer", "name"?: variable name for FINAL_VAR}.',
    )
    duration_ms: float
    memory_bytes: int
    state: dict[str, JsonValue] | None = Field(
        None, description="The shared `state` dict after the execution."
    )
    state_lost: bool = Field(
        False,
        description="The sandbox was killed (timeout grace or crash) and variables were lost.",
    )
    sub_calls: list[SubCallUsage] = Field(
        default_factory=list,
        description="The answered sub-calls of this execution, with their usage.",
    )


class ContextRef(_Model):
    """A context the runtime holds by content hash (`PUT /contexts/{sha256}`), bound by index."""

    index: int = Field(
        0, ge=0, lt=MAX_CONTEXT_INDEXES, description="Bound as `context_<index>` (0: `context`)."
    )
    sha256: str = Field(
        pattern=CONTEXT_HASH_PATTERN,
        description="Lowercase hex sha256 of the context's JSON bytes, as uploaded.",
    )
    fresh: bool = Field(
        False,
        description="Bind it anew even where the snapshot already holds this index (the "
        "context of that index was replaced since the snapshot was taken).",
    )


class StatelessExecuteRequest(_Model):
    """`POST /execute`: code plus the namespace blob of an earlier call (remote placement)."""

    code: str
    snapshot: str | None = Field(None, description="Base64 blob from an earlier response.")
    context: Context | None = Field(
        None,
        description="Loaded as `context` before the code, and kept in the returned snapshot "
        "(the inline form; `contexts` sends a context once).",
    )
    contexts: list[ContextRef] | None = Field(
        None,
        max_length=MAX_CONTEXT_INDEXES,
        description="Contexts by hash, bound before the code and left out of the returned "
        "snapshot; a hash the replica does not hold answers 409 context_unknown.",
    )
    broker: BrokerAccess | None = None
    limits: Limits = Limits()
    state: dict[str, JsonValue] | None = None

    @model_validator(mode="after")
    def _one_context_form(self) -> Self:
        if self.context is not None and self.contexts is not None:
            raise ValueError("give `context` or `contexts`, not both")
        indexes = [ref.index for ref in self.contexts or ()]
        if len(set(indexes)) != len(indexes):
            raise ValueError("each context index may be referenced once")
        return self


class StatelessExecuteResult(_Model):
    result: ExecutionResult
    snapshot: str = Field(description="Base64 blob to send with the next call to keep variables.")


class VarInfo(_Model):
    name: str
    type: str
    size: int | None = None
    preview: str


class VarsResponse(_Model):
    variables: list[VarInfo]
